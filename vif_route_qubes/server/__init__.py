"""The command server (CONTRACT section 7): the engine loaded once and forked per event.

protocol.py  the wire format (light: the client imports it)
client.py    the console entry points: offer the event, else run it in-process
command.py   the `serve` click command
serve.py     `vif-route-qubes serve`: the poll loop, one child per request
listen.py    the socket systemd passes, or one bound at --socket
warm.py      the imports before any fork; the fingerprint of the installed code
child.py     what a forked child does before it runs the click entry
reaper.py    ending a child and everything it started when its client is gone
"""
