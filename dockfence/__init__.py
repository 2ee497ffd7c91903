"""dockfence: source allow-lists for published Docker container ports, enforced with nftables."""

__version__ = "0.1.0"
