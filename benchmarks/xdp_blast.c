// Benchmark traffic source: BPF_PROG_RUN in live-frames mode (kernel >= 5.18).
// A two-instruction XDP program returns XDP_TX for one prebuilt
// Ethernet/IPv4/UDP frame, so the kernel sends it out of IFNAME by the
// driver's ndo_xdp_xmit: no socket, no skb, far faster than AF_PACKET. On a
// veth the frame lands straight in the peer's XDP receive path.
// usage: xdp_blast IFNAME DST_MAC SRC_IP DST_IP PORT SECONDS
// Prints, after each batch, "at <CLOCK_MONOTONIC seconds> <frames offered so
// far>" (so the offered rate can be read over the receiver's own window, on
// the same clock), then "<frames offered> <seconds>".
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <linux/bpf.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REPEAT 65536

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

static double since(const struct timespec *start)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - start->tv_sec) + (now.tv_nsec - start->tv_nsec) / 1e9;
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

	// r0 = XDP_TX; exit
	struct bpf_insn insns[] = {
		{.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = XDP_TX},
		{.code = BPF_JMP | BPF_EXIT},
	};
	int prog = bpf_prog_load(BPF_PROG_TYPE_XDP, "xdp_blast", "GPL", insns, 2, NULL);
	// data_end must equal the frame size: the kernel checks the context against it.
	struct xdp_md ctx = {.data_end = sizeof(frame), .ingress_ifindex = if_nametoindex(argv[1])};
	if (prog < 0 || ctx.ingress_ifindex == 0) {
		perror("xdp_blast setup");
		return 1;
	}
	LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = frame, .data_size_in = sizeof(frame),
		    .ctx_in = &ctx, .ctx_size_in = sizeof(ctx), .repeat = REPEAT,
		    .flags = BPF_F_TEST_XDP_LIVE_FRAMES);
	struct timespec start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	printf("at %.6f 0\n", start.tv_sec + start.tv_nsec / 1e9);
	double limit = atof(argv[6]);
	long sent = 0;
	while (since(&start) < limit) {
		if (bpf_prog_test_run_opts(prog, &opts)) {
			perror("BPF_PROG_RUN");
			return 1;
		}
		sent += REPEAT;
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		printf("at %.6f %ld\n", now.tv_sec + now.tv_nsec / 1e9, sent);
	}
	printf("%ld %.6f\n", sent, since(&start));
	return 0;
}
