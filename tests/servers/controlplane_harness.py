"""Start the control-plane stand-in as a real subprocess from pytest.

    with start_control_plane(tmp_path) as cp:
        client = ControlPlane(ControlPlaneSettings(url=cp.url), key)
        client.heartbeat({...})
        cp.heartbeats()  # the verified bodies it accepted

The child runs ``sys.executable -m tests.servers.controlplane_server`` from the repository root;
``certfile`` (key and chain in one PEM) makes it speak HTTPS. Test controls go over plain
HTTP(S) to the unsigned ``/_test/`` routes; see the server module for what each one does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.servers.ready import Closing, ServerStartError, read_ready_line

REPO_ROOT = Path(__file__).resolve().parents[2]


class ControlPlaneServer(Closing):
    """A running stand-in; every method but ``close`` is a call to its test routes."""

    def __init__(self, tmp_dir: Path, *, certfile: Path | None = None) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = tmp_dir
        self.certfile = certfile
        self.url = ""
        self._stderr_path = tmp_dir / "controlplane-server.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        # The harness trusts its own child; the client under test is what checks TLS.
        self._http = httpx.Client(timeout=10.0, trust_env=False, verify=False)

    def start(self) -> None:
        args = [sys.executable, "-m", "tests.servers.controlplane_server", "--port", "0"]
        if self.certfile is not None:
            args += ["--certfile", str(self.certfile)]
        with self._stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, env=dict(os.environ)
            )
        parts = self._read_ready().split()
        if len(parts) != 2 or parts[0] != "READY":
            self.close()
            raise ServerStartError(f"unexpected first line {parts!r}\n{self.stderr()}")
        self.url = parts[1]

    def _read_ready(self) -> str:
        assert self._proc is not None
        return read_ready_line(
            self._proc, what="control-plane test server", stderr=self.stderr, give_up=self.close
        )

    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        """SIGTERM (SIGKILL after 5 s), wait, and close the control client."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(5.0)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        finally:
            self._http.close()

    # test controls -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, self.url + path, json=body)
        resp.raise_for_status()
        return resp.json()

    def received(self) -> list[dict[str, Any]]:
        """Every node request since the last reset, oldest first.

        Each is ``{method, path, body (parsed JSON or None), raw, pubkey (verified, else
        None), status (0: connection dropped), error, time}``.
        """
        result: list[dict[str, Any]] = self._call("GET", "/_test/requests")
        return result

    def heartbeats(self) -> list[dict[str, Any]]:
        """Bodies of heartbeats whose signature verified and that were accepted (200)."""
        return [
            r["body"]
            for r in self.received()
            if r["path"] == "/api/v1/node/heartbeat" and r["pubkey"] and r["status"] == 200
        ]

    def nodes(self) -> list[dict[str, Any]]:
        """The stored node rows, each with its ``role``: what register and heartbeat left."""
        result: list[dict[str, Any]] = self._call("GET", "/_test/nodes")
        return result

    def enqueue_command(self, pubkey: str, command: str, args: dict[str, Any] | None = None) -> str:
        """Queue a command for ``pubkey`` as an owner would; returns its id."""
        body = {"pubkey": pubkey, "command": command, "args": args or {}}
        return str(self._call("POST", "/_test/commands", body)["id"])

    def command(self, command_id: str) -> dict[str, Any]:
        """The command row: status, progress, result, error, timestamps and call counts."""
        result: dict[str, Any] = self._call("GET", f"/_test/commands/{command_id}")
        return result

    def cancel(self, command_id: str) -> dict[str, Any]:
        """Cancel as the owner does: pending/running → cancelled; others are left alone."""
        result: dict[str, Any] = self._call("POST", f"/_test/commands/{command_id}/cancel")
        return result

    def set_down(
        self,
        seconds: float | None,
        *,
        mode: str = "503",
        interval: float | None = None,
        size: int | None = None,
    ) -> None:
        """Misbehave for ``seconds`` (None: behave again).

        ``mode``: ``503`` answers 503 JSON; ``close`` drops the connection unanswered;
        ``garbage`` answers 200 with an HTML page; ``hang`` waits out the period, then 503;
        ``trickle`` sends its answer one byte every ``interval`` seconds (headers included);
        ``huge`` answers 200 JSON of ``size`` bytes without a Content-Length.
        """
        body: dict[str, Any] = {"seconds": seconds, "mode": mode}
        if interval is not None:
            body["interval"] = interval
        if size is not None:
            body["size"] = size
        self._call("POST", "/_test/down", body)

    def ignore_poll_limit(self, ignore: bool = True) -> None:
        """Hand out every pending command on a poll, whatever ``limit`` the node asked for."""
        self._call("POST", "/_test/poll_limit", {"ignore": ignore})

    def set_clock_offset(self, seconds: float) -> None:
        """Run the server's clock ``seconds`` ahead (negative: behind) for the skew check."""
        self._call("POST", "/_test/clock", {"offset": seconds})

    def reset(self) -> None:
        """Forget nodes, commands, requests and nonces; clear faults and the clock offset."""
        self._call("POST", "/_test/reset")


def start_control_plane(tmp_dir: Path, *, certfile: Path | None = None) -> ControlPlaneServer:
    """Start the server and wait for READY (10 s); the caller closes it (or uses ``with``)."""
    server = ControlPlaneServer(tmp_dir, certfile=certfile)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
