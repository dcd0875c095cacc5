// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// The per-allocation XDP program (DESIGN.md 3.4): frames arriving on a queue
// whose index has an AF_XDP socket in xsks_map go to that socket; everything
// else continues to the kernel stack. Pods insert their socket at their queue
// index; they never load a program themselves.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

SEC("xdp")
int xdp_afxdp_redirect(struct xdp_md *ctx)
{
	__u32 index = ctx->rx_queue_index;

	if (bpf_map_lookup_elem(&xsks_map, &index))
		return bpf_redirect_map(&xsks_map, index, 0);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
