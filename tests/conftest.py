"""Shared by every test folder: the kit (tests/kit: helpers, stand-ins) importable
by its module names, and the markers.  Nothing here needs root: tests/unit runs as
any user; tests/netns and tests/system check what they need in their own conftest."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "kit"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "no_event: runs no command, though it takes a fixture that could")
