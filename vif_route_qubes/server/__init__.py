"""The command server (CONTRACT section 7): the engine loaded once and forked per event.

It knows nothing of click's command tree: `vif-route-qubes serve` is a click
command in cli/commands.py, and the served commands' entry points are named in
the `vif_route_qubes.served` entry point group (commands.py).

protocol.py  the wire format (light: the client imports it)
client.py    the console entry points: offer the event, else run it in-process
commands.py  the commands served, from the entry point group
serve.py     the poll loop, one child per request
intake.py    a request being read, until it is whole
jobs.py      the children running requests, and their clients
spare.py     the child forked ahead for the next request
listen.py    the socket systemd passes, or one bound at --socket
warm.py      the imports before any fork; the fingerprint of the installed code
child.py     what a forked child does before it runs the click entry
reaper.py    ending a child and everything it started when its client is gone
"""
