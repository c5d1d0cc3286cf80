"""What talks to the kernel and to other programs: pyroute2 (ip.py) and sh (tools.py)."""
