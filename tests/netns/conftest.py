"""Fixtures of the namespace tests (root; the kit is on sys.path: tests/conftest.py).

    command_server (session, autouse)  server mode: one `vif-route-qubes serve` for the run
    netns, xen, vifcmd, backend        namespaces, a file-backed xenstore/qubesdb, our command,
                                       the firewall backend (each test that takes it runs per backend)
"""

import os

import pytest

import needs
import server_mode
from firewall import BACKENDS
from netns import BIN, RUN_PREFIX, Namespace, Namespaces, XenEnv, sh


@pytest.fixture(scope="session", autouse=True)
def _needs_root():
    reason = needs.missing()
    if reason:
        pytest.exit(reason, returncode=2)


@pytest.fixture(scope="session", autouse=True)
def command_server(_needs_root, tmp_path_factory):
    """Server mode (tests/kit/server_mode.py): ONE server for the run, in a network
    namespace made for it, so that a bug acting in the server's own namespace
    hits a test namespace, never the root one; stopped by its pid at the end."""
    if server_mode.MODE != "server":
        server_mode.use(None)
        yield None
        return
    home = Namespace(f"{RUN_PREFIX}-server")
    sh(f"ip netns add {home.name}")
    server = None
    try:
        server = server_mode.TestServer(BIN, home.name, tmp_path_factory.mktemp("server"))
        server_mode.use(server)
        os.environ.update(server.env())  # environments the tests copy from ours
        yield server
    finally:
        if server:
            server.stop()
        sh(f"ip netns del {home.name}", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so that a fixture's teardown knows
    whether the test itself passed (a skipped or failed one is not counted)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


# A test that takes one of these runs our commands: in server mode its events must be served.
RUNS_COMMANDS = {"vifcmd", "xen", "box"}


@pytest.fixture(autouse=True)
def _events_served(request, command_server):
    import inspect

    names = set(request.fixturenames)
    own = set(inspect.signature(request.function).parameters)
    if command_server is None or not RUNS_COMMANDS & names or ("own_server" in own and "command_server" not in own):
        yield
        return
    before = command_server.served()
    yield
    passed = getattr(request.node, "rep_call", None)
    if passed is not None and passed.passed and request.node.get_closest_marker("no_event") is None:
        assert command_server.served() > before, "server mode: no event of this test was served"


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
