// Somebody else's XDP program, for tests that need a foreign one on a link.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int someone_elses_prog(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
