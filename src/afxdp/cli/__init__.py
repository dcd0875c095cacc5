"""Command-line entry points: ``afxdpd`` (the node service) and ``afxdpctl``."""
