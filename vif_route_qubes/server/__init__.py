"""The command server (CONTRACT section 7): the engine loaded once and forked per event.

protocol.py  the wire format (light: the client imports it)
client.py    the console entry points: offer the event, else run it in-process
serve.py     `vif-route-qubes serve`: accept loop, one child per request
child.py     what a forked child does before it runs the click entry
reaper.py    ending a child and everything it started when its client is gone
"""
