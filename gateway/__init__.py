"""edge-gateway: the daemon core (config, buffer, upstream, wiring)."""

__version__ = "0.1.0"
