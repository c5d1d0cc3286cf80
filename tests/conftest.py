import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from firewall import BACKENDS  # noqa: E402
from netns import BIN, Namespaces, XenEnv  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")


@pytest.fixture(scope="session", autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.exit("the tests build network namespaces and must run as root", returncode=2)
    for tool in ("ip", "iptables-restore", "ip6tables-restore", "nft"):
        if not shutil.which(tool):
            pytest.exit(f"{tool} is missing: install iproute2, iptables and nftables", returncode=2)
    if not (BIN / "vif-route-qubes").exists():
        pytest.exit(f"vif-route-qubes is not installed beside {sys.executable}", returncode=2)


@pytest.fixture
def netns():
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()


@pytest.fixture
def xen(tmp_path):
    return XenEnv(tmp_path)


@pytest.fixture
def vifcmd():
    return str(BIN / "vif-route-qubes")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """The firewall backend under test: a test that takes it runs once per
    backend and gives it to the commands it runs as QUBES_NET_BACKEND (session
    scope, so that a module's shared topology can be built once per backend)."""
    return request.param
