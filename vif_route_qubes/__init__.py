"""Routed networking for Xen vifs in a Qubes-style network-providing VM."""

__version__ = "0.1.0"
