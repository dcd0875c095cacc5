// Benchmark traffic source: sends one prebuilt Ethernet/IPv4/UDP frame as fast
// as AF_PACKET + sendmmsg allow, for a given time, on a given interface.
// usage: udp_blast IFNAME DST_MAC SRC_IP DST_IP PORT SECONDS
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static unsigned short csum(const void *data, int len)
{
	const unsigned short *p = data;
	unsigned long sum = 0;
	for (; len > 1; len -= 2)
		sum += *p++;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (unsigned short)~sum;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s IFNAME DST_MAC SRC_IP DST_IP PORT SECONDS\n", argv[0]);
		return 2;
	}
	unsigned char frame[64] = {0};
	struct ether_header *eth = (void *)frame;
	struct iphdr *iph = (void *)(frame + sizeof(*eth));
	struct udphdr *udp = (void *)(iph + 1);
	unsigned int mac[6];
	if (sscanf(argv[2], "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6)
		return 2;
	for (int i = 0; i < 6; i++)
		eth->ether_dhost[i] = (unsigned char)mac[i];
	eth->ether_shost[0] = 0x02;
	eth->ether_type = htons(ETHERTYPE_IP);
	iph->version = 4;
	iph->ihl = 5;
	iph->ttl = 64;
	iph->protocol = IPPROTO_UDP;
	iph->tot_len = htons(sizeof(frame) - sizeof(*eth));
	iph->saddr = inet_addr(argv[3]);
	iph->daddr = inet_addr(argv[4]);
	iph->check = csum(iph, sizeof(*iph));
	udp->source = htons(12345);
	udp->dest = htons((unsigned short)atoi(argv[5]));
	udp->len = htons(sizeof(frame) - sizeof(*eth) - sizeof(*iph));

	int fd = socket(AF_PACKET, SOCK_RAW, 0);
	struct sockaddr_ll addr = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(argv[1]), .sll_halen = 6};
	memcpy(addr.sll_addr, eth->ether_dhost, 6);
	if (fd < 0 || addr.sll_ifindex == 0) {
		perror("socket");
		return 1;
	}
	struct iovec iov = {frame, sizeof(frame)};
	struct mmsghdr msgs[BATCH];
	for (int i = 0; i < BATCH; i++)
		msgs[i].msg_hdr = (struct msghdr){.msg_name = &addr, .msg_namelen = sizeof(addr), .msg_iov = &iov, .msg_iovlen = 1};
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	double limit = atof(argv[6]);
	long sent = 0;
	for (;;) {
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n > 0)
			sent += n;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 >= limit)
			break;
	}
	printf("%ld\n", sent);
	return 0;
}
