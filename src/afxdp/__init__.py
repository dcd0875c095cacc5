"""afxdp: hands AF_XDP-capable network devices to Kubernetes pods."""

__version__ = "0.1.0"
