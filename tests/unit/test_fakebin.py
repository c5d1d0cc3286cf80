"""The shell stand-ins (tests/kit/fakebin/sh, for the benchmark) behave as the Python ones."""

import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

FAKEBIN = Path(__file__).resolve().parents[1] / "kit" / "fakebin"
KEYS = {"/local/domain/0/backend/vif/37/0/ip": "10.137.7.27", "/local/domain/5/backend/x": "five",
        "/qubes-netvm-gateway": "10.137.7.1", "/mapped-ip/10.137.0.5/visible-ip": "10.137.1.5",
        "/k with space & %25 é~_.-": "odd", "/empty": "", "/lines": "a\nb\n\n", "/ws": "  x  "}
CASES = [
    ["xenstore-read", "backend/vif/37/0/ip"],
    ["xenstore-read", "--", "backend/vif/37/0/ip", "/qubes-netvm-gateway"],
    ["xenstore-read", "/qubes-netvm-gateway", "missing", "/empty"],
    ["xenstore-read", "/empty", "/lines", "/ws", "/k with space & %25 é~_.-"],
    ["xenstore-read"], ["xenstore-read", "--"],
    ["xenstore-write", "backend/vif/37/0/hotplug-status", "connected", "/a b/é", "v\n"],
    ["xenstore-write", "odd"], ["xenstore-write"],
    ["qubesdb-read", "/qubes-netvm-gateway", "/mapped-ip/10.137.0.5/visible-ip"],
    ["qubesdb-read", "-f", "/qubes-netvm-gateway", "/missing", "/lines"],
    ["qubesdb-read", "-fq", "/missing", "/ws"], ["qubesdb-read", "-r", "/lines", "/ws"],
    ["qubesdb-read", "-q", "--", "/missing"], ["qubesdb-read", "--", "-f"], ["qubesdb-read", "-x", "/a"],
    ["qubesdb-read", "/a", "-f"], ["qubesdb-read"], ["qubesdb-read", "-"],
]


def outcome(tmp: Path, folder: Path, argv: list[str], **extra: str):
    tmp.mkdir()
    for name in ("xs", "q"):
        (tmp / name).mkdir()
        for key, value in KEYS.items():
            (tmp / name / quote(key, safe="")).write_text(value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update(FAKE_XENSTORE_DIR=str(tmp / "xs"), FAKE_QUBESDB_DIR=str(tmp / "q"), **extra)
    result = subprocess.run([str(folder / argv[0]), *argv[1:]], env=env, capture_output=True)
    files = {f"{d.name}/{f.name}": f.read_bytes() for d in (tmp / "xs", tmp / "q") for f in sorted(d.iterdir())}
    return result.returncode, result.stdout, result.stderr, files


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c) for c in CASES])
@pytest.mark.parametrize("extra", [{}, {"FAKE_XENSTORE_DOMID": "5"}, {"FAKE_XENSTORE_WRITE_FAIL": "1"}],
                         ids=["domid-0", "domid-5", "write-fail"])
def test_shell_stand_ins_as_python_ones(tmp_path, argv, extra):
    python = outcome(tmp_path / "py", FAKEBIN, argv, **extra)
    assert outcome(tmp_path / "sh", FAKEBIN / "sh", argv, **extra) == python
    assert python[0] in (0, 1, 2)


def test_store_not_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    for name in ("xenstore-read", "qubesdb-read"):
        py = subprocess.run([str(FAKEBIN / name), "/a"], env=env, capture_output=True)
        sh = subprocess.run([str(FAKEBIN / "sh" / name), "/a"], env=env, capture_output=True)
        variable = "FAKE_XENSTORE_DIR" if name.startswith("xen") else "FAKE_QUBESDB_DIR"
        expected = (1, b"", f"{name}: {variable} is not set\n".encode())
        assert (sh.returncode, sh.stdout, sh.stderr) == (py.returncode, py.stdout, py.stderr) == expected
