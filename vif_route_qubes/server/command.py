"""The `serve` click command (registered by one line in commands.py)."""

import click

from vif_route_qubes.cli.commands import cli
from vif_route_qubes.cli.options import Seconds
from vif_route_qubes.server.protocol import DEFAULT_SOCKET


@cli.command("serve")
@click.option("--socket", "socket_path", envvar="VIF_ROUTE_SERVER_SOCKET", show_envvar=True,
              default=DEFAULT_SOCKET, show_default=True,
              help="Listen here (mode 0600) unless systemd passes a socket (LISTEN_FDS).")
@click.option("--idle-timeout", type=Seconds(0.0), default=None, show_default="none: resident",
              help="Exit after this many seconds without a request (running events finish first); "
                   "systemd starts the server again for the next event.")
@click.option("--spare/--no-spare", "spare", default=True, show_default=True,
              help="Keep one child forked ahead, its memory already its own, for the next "
                   "request: a faster event, for about 30 MB while it waits.")
@click.option("--spare-idle", type=Seconds(0.0), default=30.0, show_default=True,
              help="Drop the spare after this many seconds without a request; the next "
                   "request makes it again.")
def serve(socket_path, idle_timeout, spare, spare_idle):
    """Serve events: the engine loaded once, a child forked per event.

    The commands' entry points offer each event here first and run it
    themselves when no server takes it.  Every event is logged on stderr
    ("served ... by child N"); `-v` of an event says "served by
    vif-route-qubes server pid N".  Resident unless --idle-timeout; the spare
    child goes after --spare-idle seconds without a request, so a quiet server
    holds only its own memory.
    """
    from vif_route_qubes.server.serve import serve as run

    run(socket_path, idle_timeout, spare, spare_idle)
