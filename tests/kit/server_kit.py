"""Helpers of the server tests (test_server.py, test_server_life.py): a server of
the test's own, in a namespace of its own, and small waits on processes."""

import os
import subprocess
from pathlib import Path

import pytest

import server_mode
from netns import BIN, RUN_PREFIX, pids_in, sh, wait_for  # noqa: F401  (the server tests import them from here)

PY = str(BIN / "python")
VIFCMD = str(BIN / "vif-route-qubes")
HEAVY = ("click", "pyroute2", "sh")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_server(tmp_path):
    """A server of the test's own (its own namespace, socket and log), stopped by pid."""
    made = []

    def start(idle=None, folder=None, args=(), **env):
        """idle: --idle-timeout (None: the default, resident)."""
        home = f"{RUN_PREFIX}-srv{len(made)}"
        sh(f"ip netns add {home}")
        if folder is None:
            folder = tmp_path / f"server{len(made)}"
            folder.mkdir()
        try:
            server = server_mode.TestServer(BIN, home, folder, idle=idle, extra_env=env, args=tuple(args))
        except BaseException:
            sh(f"ip netns del {home}", check=False)
            raise
        made.append((server, home))
        return server

    yield start
    for server, home in made:
        server.stop()
        sh(f"ip netns del {home}", check=False)


def served_env(server, **extra):
    return {**{k: v for k, v in os.environ.items() if not k.startswith("VIF_ROUTE_")}, **server.env(), **extra}


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""



def run_help(server, **extra):
    return subprocess.run([VIFCMD, "--version"], capture_output=True, text=True,
                          env=served_env(server, **extra), timeout=30)


