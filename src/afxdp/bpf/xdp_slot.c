// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// The per-device XDP program (map-in-map layout): attached once, when the
// device joins a pool, and kept. Its one slot (key 0 of ``slot``) holds the
// XSKMAP of the pod the device is handed to, put there with one map update at
// Allocate and removed at release: a pod's handout changes no program, so it
// costs no rtnl and no RCU grace period. Frames on a queue whose index has an
// AF_XDP socket in that XSKMAP go to the socket; everything else (an empty
// slot, no socket on the queue, control frames when ``config`` says so)
// continues to the kernel stack. Each verdict is counted per CPU, per queue.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in6.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define N_QUEUES 64   // the XSKMAP's size, as the per-pod program's
#define N_ACTIONS 3
// Counter index = queue * N_ACTIONS + action; queues from N_QUEUES up share
// the last row (no socket can be bound there: the XSKMAP has no such key).
enum action { REDIRECTED = 0, NO_SOCKET = 1, CONTROL = 2 };
#define CONFIG_CONTROL_TO_KERNEL 1  // bit of config[0]

struct xsk_inner {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, N_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct xsk_inner);
} slot SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, (N_QUEUES + 1) * N_ACTIONS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} config SEC(".maps");

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

static __always_inline void count(__u32 queue, __u32 action)
{
	__u32 key = (queue < N_QUEUES ? queue : N_QUEUES) * N_ACTIONS + action;
	__u64 *n = bpf_map_lookup_elem(&counters, &key);

	if (n)
		*n += 1;  // per CPU: no other CPU writes it
}

// ARP, or IPv6 neighbour discovery (ICMPv6 133-137: router and neighbour
// solicitation and advertisement, redirect), untagged or behind one VLAN tag.
static __always_inline int is_control(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *next = eth + 1;
	__be16 proto;

	if (next > end)
		return 0;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vlan = next;

		if ((void *)(vlan + 1) > end)
			return 0;
		proto = vlan->proto;
		next = vlan + 1;
	}
	if (proto == bpf_htons(ETH_P_ARP))
		return 1;
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = next;
		struct icmp6hdr *icmp;

		// ND carries no extension headers (RFC 4861 and hop limit 255).
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_ICMPV6)
			return 0;
		icmp = (void *)(ip6 + 1);
		if ((void *)(icmp + 1) > end)
			return 0;
		return icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137;
	}
	return 0;
}

SEC("xdp")
int xdp_afxdp_slot(struct xdp_md *ctx)
{
	__u32 queue = ctx->rx_queue_index;
	__u32 zero = 0;
	__u32 *flags = bpf_map_lookup_elem(&config, &zero);
	void *inner;

	if (flags && (*flags & CONFIG_CONTROL_TO_KERNEL) && is_control(ctx)) {
		count(queue, CONTROL);
		return XDP_PASS;
	}
	inner = bpf_map_lookup_elem(&slot, &zero);
	if (inner && bpf_map_lookup_elem(inner, &queue)) {
		count(queue, REDIRECTED);
		return bpf_redirect_map(inner, queue, XDP_PASS);
	}
	count(queue, NO_SOCKET);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
