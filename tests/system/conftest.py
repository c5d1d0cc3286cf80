"""Fixtures of the booted-system tests (the kit: booted.py, standins.py, vmnet.py).

They run once per CI run: skipped under VRQ_TEST_MODE=in-process (the README's
test command runs the suite twice; the container does not depend on the mode),
and skipped with the reason where systemd-nspawn cannot boot a container.

    debian_tar (session)     the cached Debian 12 root tarball (debroot.tarball)
    wheelhouse (session)     the project's dependency wheels for the offline pip install
    boot_container(request, name, setup=None) -> Container
                             a fresh container booted with xenstore/qubesdb stand-ins
                             (`setup(box)` runs on its files before the boot), powered off
                             and deleted at the end of the requesting fixture's scope;
                             a boot that fails (nothing of ours in it yet) skips, with why
    module_namespaces        a netns.Namespaces for the module, cleaned up at its end
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import booted  # noqa: E402
import debroot  # noqa: E402
import needs  # noqa: E402  (tests/kit, on sys.path by tests/conftest.py)
import standins  # noqa: E402
from netns import Namespaces  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _system_tests_run_here():
    reason = needs.missing()
    if reason:
        pytest.exit(reason, returncode=2)
    if os.environ.get("VRQ_TEST_MODE", "server") == "in-process":
        pytest.skip("booted-system tests run once per CI run, in the server-mode pass")
    reason = booted.cannot_boot()
    if reason:
        pytest.skip(f"systemd-nspawn cannot boot a container here: {reason}")


@pytest.fixture(scope="session")
def debian_tar(_system_tests_run_here, tmp_path_factory):
    return debroot.tarball(tmp_path_factory.mktemp("debroot"))


@pytest.fixture(scope="session")
def wheelhouse(_system_tests_run_here, tmp_path_factory):
    return standins.make_wheelhouse(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def boot_container(debian_tar, tmp_path_factory):
    """A factory: boot_container(request, name, setup=None); the container is
    closed by a finalizer of `request` (the calling fixture's scope)."""

    def make(request, name: str, setup=None) -> booted.Container:
        folder = tmp_path_factory.mktemp(name)

        def prepare(box):
            standins.xen_standins(box)
            if setup:
                setup(box)

        try:
            box = booted.Container.boot(folder, debian_tar, prepare)
        except booted.BootFailed as exc:  # before anything of ours runs in it: this host cannot
            log = (folder / "nspawn.log").read_text(errors="replace").strip().splitlines()[-5:]
            pytest.skip(f"systemd-nspawn cannot boot a container here: {exc}; " + " | ".join(log))
        request.addfinalizer(box.close)
        return box

    return make


@pytest.fixture(scope="module")
def module_namespaces():
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()
