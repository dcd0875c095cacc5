"""``python -m afxdp.demo``: the main job on one machine, with no Kubernetes.

A stand-in kubelet (``afxdp.devnode``), afxdpd as a process, two veth "NICs"
and two pods (network namespaces) that get a device through Allocate, CNI ADD
through the real shim, the UDS handshake and an AF_XDP socket that receives
frames. Needs root; leaves nothing behind, also when interrupted.
"""
