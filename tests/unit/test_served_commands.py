"""The served commands' table (server/commands.py): the server's own command is
known without importlib.metadata, which the event that makes systemd start the
server would otherwise wait for (~15 ms) before its hello; another package's
command comes from the entry point group."""

import subprocess
import sys

PROBE = """
import sys
from vif_route_qubes.server import commands, serve  # all the server imports before its first hello
print("importlib.metadata" in sys.modules)
module_of = commands.module_of
print(module_of("vif-route-qubes"), "importlib.metadata" in sys.modules)
print(module_of("qubes-setup-dnat-to-ns"), "importlib.metadata" in sys.modules)
print(module_of("no-such-command"), module_of(["vif-route-qubes"]))
"""


def test_own_command_is_known_before_the_entry_point_group_is_read():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    assert result.stdout.split("\n")[0] == "False", "the server imports importlib.metadata before its first hello"
    assert result.returncode == 0, result.stderr
    _, own, other, unknown = result.stdout.splitlines()
    assert own == "vif_route_qubes.cli.main False"
    assert other.split() == ["setup_dnat_to_ns.cli", "True"]
    assert unknown == "None None"
