"""The CNI side of afxdpd: requests forwarded by the ``afxdp`` shim (cni_shim/)."""
