"""The mode the namespace suite runs the commands in (issue 16).

    VRQ_TEST_MODE=server      (default) one `vif-route-qubes serve` for the whole run,
                              started in a network namespace of its own, with its own
                              socket, resident (no idle timeout); the commands get
                              VIF_ROUTE_SERVER_SOCKET and VIF_ROUTE_SERVER=require, so an
                              event no server took fails instead of passing in-process
    VRQ_TEST_MODE=in-process  the commands get VIF_ROUTE_SERVER=off

In server mode every test that runs a command must have had events served
(conftest counts the server's "served" lines around each test).
"""

import os
import subprocess
import time
from pathlib import Path

MODE = os.environ.get("VRQ_TEST_MODE", "server")
if MODE not in ("server", "in-process"):
    raise SystemExit(f"VRQ_TEST_MODE={MODE!r}: want server or in-process")
_env: dict[str, str] = {"VIF_ROUTE_SERVER": "off"} if MODE == "in-process" else {}


def mode_env() -> dict[str, str]:
    """What XenEnv.env (and every other environment the tests build) adds."""
    return dict(_env)


class TestServer:
    """One server: `ip netns exec NS vif-route-qubes serve --socket ...`, stopped by pid."""

    def __init__(self, bin_dir: Path, netns: str, folder: Path, idle: float | None = None,
                 extra_env: dict | None = None, args: tuple = ()) -> None:
        """`idle`: --idle-timeout; None for the default (resident, as installed)."""
        self.socket = folder / "server.sock"
        self.log_path = folder / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIF_ROUTE_")}
        env.update(extra_env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "nice", "-n", "-10",  # as the unit's Nice=
                                          str(bin_dir / "vif-route-qubes"), "serve",
                                          "--socket", str(self.socket),
                                          *(["--idle-timeout", str(idle)] if idle is not None else []), *args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while not self.log_path.read_text().count("listening on"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self) -> dict[str, str]:
        return {"VIF_ROUTE_SERVER_SOCKET": str(self.socket), "VIF_ROUTE_SERVER": "require"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def served(self) -> int:
        return sum(" served " in line for line in self.log().splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def use(server: TestServer | None) -> None:
    _env.clear()
    _env.update(server.env() if server else {"VIF_ROUTE_SERVER": "off"})
