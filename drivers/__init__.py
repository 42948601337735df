"""Southbound protocol drivers; `drivers.registry` lists every driver type."""
