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
import time
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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

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

    def received(self, since: int = 0) -> list[dict[str, Any]]:
        """Every node request since the last reset, oldest first (from the ``since``-th on).

        Each is ``{method, path, body (parsed JSON or None), raw, pubkey (verified, else
        None), status (0: connection dropped), error, time}``; ``time`` is when the answer
        was ready (just before it is sent). A ``/jobs/poll`` answered 200 also has ``jobs``:
        the ids its answer carried.
        """
        result: list[dict[str, Any]] = self._call("GET", f"/_test/requests?since={since}")
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

    def enqueue_command(
        self, pubkey: str, command: str, args: dict[str, Any] | None = None, *, shape: str = ""
    ) -> str:
        """Queue a command for ``pubkey`` as an owner would; returns its id. ``shape="flat"``
        hands it to the node as the seed writes one: ``{id, type, model, issued_at}``."""
        body = {"pubkey": pubkey, "command": command, "args": args or {}, "shape": shape}
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
        """Forget nodes, commands, jobs, requests and nonces; clear faults and the clock offset."""
        self._call("POST", "/_test/reset")

    # jobs (see controlplane_jobs.py) -----------------------------------------------------------

    def create_job(
        self,
        pubkey: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model_name: str | None = None,
        max_tokens: Any = 512,
        temperature: Any = 0.7,
        input_spec: Any = None,
        type: str = "chat",
        status: str | None = None,
        title: str | None = None,
        created_at: str | None = None,
        age_s: float | None = None,
        payment_offer: Any = 0,
        payment_coin: str | None = None,
    ) -> str:
        """Insert a job row; its id.

        With ``pubkey`` (a registered provider's, else 404) the job is ``assigned`` to it, as
        the router leaves it; without, it is ``pending`` with no provider. ``input_spec``
        defaults to ``{messages, max_tokens, temperature}`` (None gives JSON null, as
        ``/api/chat`` can store), ``messages`` to ``[{"role": "user", "content": "Say
        hello."}]``, ``title`` to the first
        user message cut to 80 characters (``"chat"`` without one). ``created_at`` (ISO 8601)
        or ``age_s`` back-dates the job; ``status`` overrides the status.
        """
        body: dict[str, Any] = {
            "pubkey": pubkey,
            "messages": messages,
            "model_name": model_name,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "input_spec": input_spec,
            "type": type,
            "status": status,
            "title": title,
            "created_at": created_at,
            "age_s": age_s,
            "payment_offer": payment_offer,
            "payment_coin": payment_coin,
        }
        return str(self._call("POST", "/_test/jobs", body)["id"])

    def create_jobs(
        self,
        count: int,
        pubkey: str | None = None,
        *,
        each: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> list[str]:
        """``count`` jobs as :meth:`create_job` makes them, inserted at once (a poll sees all
        or none of them); ``each[i]`` overrides fields of the i-th. Their ids."""
        body = {"pubkey": pubkey} | fields
        bodies = [body | (each[i] if each else {}) for i in range(count)]
        rows = self._call("POST", "/_test/job_batch", {"jobs": bodies})
        return [str(row["id"]) for row in rows]

    def assign_job(self, job_id: str, pubkey: str) -> dict[str, Any]:
        """Give the job to ``pubkey``'s provider (``assigned``, ``assigned_at`` now); its row."""
        result: dict[str, Any] = self._call(
            "POST", f"/_test/jobs/{job_id}/assign", {"pubkey": pubkey}
        )
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        """The ``jobs`` row (every column) plus test-only keys.

        ``complete_calls`` (stored ``/complete`` calls), ``completions`` (``[{body, time}]``,
        one per stored call), ``event_batches`` (stored event requests),
        ``events_inflight_max`` (most event requests in flight at once for this job),
        ``provider_node_id`` and ``provider_pubkey`` (the assignee's, or None).
        """
        result: dict[str, Any] = self._call("GET", f"/_test/jobs/{job_id}")
        return result

    def jobs(self) -> list[dict[str, Any]]:
        """Every job as :meth:`job` gives it, oldest ``created_at`` first."""
        result: list[dict[str, Any]] = self._call("GET", "/_test/jobs")
        return result

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's ``job_events`` rows ``{id, job_id, event_type, data, created_at}`` by id."""
        result: list[dict[str, Any]] = self._call("GET", f"/_test/jobs/{job_id}/events")
        return result

    def token_text(self, job_id: str) -> str:
        """What the playground shows: the ``token`` events' texts, joined in id order."""
        return "".join(
            str(e["data"].get("text", "")) if isinstance(e["data"], dict) else ""
            for e in self.job_events(job_id)
            if e["event_type"] == "token"
        )

    def complete_calls(self, job_id: str) -> int:
        """How many ``/complete`` calls for the job were stored (the server never dedups)."""
        return int(self.job(job_id)["complete_calls"])

    def wait_job(
        self,
        job_id: str,
        statuses: tuple[str, ...] = ("completed", "failed"),
        *,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Poll :meth:`job` until its status is one of ``statuses``; the row (AssertionError)."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.job(job_id)
            if row["status"] in statuses:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stayed {row['status']!r}: {row}")
            time.sleep(0.02)

    def pick_provider(
        self, model_name: str | None = None, *, seed: int | None = None, draw: float | None = None
    ) -> dict[str, Any] | None:
        """The provider row the real router (``pickChatProvider``) would pick now, or None.

        Live = ``available`` and seen in the last 2 min; a named model must be in
        ``specs.served_models`` exactly; saturated nodes are dropped; the draw is weighted by
        reputation × speed × headroom. ``seed`` seeds the draw, ``draw`` is ``Math.random()``'s
        value itself; neither: an unseeded draw.
        """
        body = {"model_name": model_name, "seed": seed, "draw": draw}
        result: dict[str, Any] | None = self._call("POST", "/_test/pick", body)["provider"]
        return result

    def router_candidates(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """Providers left after the router's filters: ``[{node_id, public_key, weight}]``.

        A provider's chance is its weight over the sum (one candidate: always, no draw).
        """
        result: list[dict[str, Any]] = self._call(
            "POST", "/_test/pick", {"model_name": model_name}
        )["candidates"]
        return result

    def create_chat(
        self,
        messages: list[dict[str, Any]],
        model_name: str | None = None,
        *,
        max_tokens: Any = 512,
        temperature: Any = 0.7,
        seed: int | None = None,
        draw: float | None = None,
    ) -> dict[str, Any]:
        """``createChatJob`` (without NIM): pick as :meth:`pick_provider`, insert, assign.

        Returns ``{"job": row (as :meth:`job`), "provider": row or None, "source": "p2p" or
        "none"}``; with no provider the job is left ``pending``, as the real one leaves it.
        """
        body = {
            "messages": messages,
            "model_name": model_name,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "draw": draw,
        }
        result: dict[str, Any] = self._call("POST", "/_test/chats", body)
        return result

    def add_provider(
        self,
        node_id: str | None = None,
        *,
        pubkey: str | None = None,
        specs: dict[str, Any] | None = None,
        reputation: Any = 50,
        status: str = "available",
        last_seen_age_s: float = 0.0,
    ) -> dict[str, Any]:
        """A peer provider row (as register + heartbeat leave one), no signing; the row."""
        body: dict[str, Any] = {
            "node_id": node_id,
            "pubkey": pubkey,
            "reputation": reputation,
            "status": status,
            "last_seen_age_s": last_seen_age_s,
        }
        if specs is not None:
            body["specs"] = specs
        result: dict[str, Any] = self._call("POST", "/_test/providers", body)
        return result

    def update_provider(
        self, pubkey: str, *, last_seen_age_s: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Set a provider's ``reputation``, ``status``, ``specs``, ``name`` or last-seen age."""
        body = {"pubkey": pubkey, "last_seen_age_s": last_seen_age_s} | fields
        result: dict[str, Any] = self._call("POST", "/_test/providers/update", body)
        return result

    def job_fault(
        self,
        route: str,
        kind: str,
        *,
        times: int | None = 1,
        job_id: str | None = None,
        status: int = 500,
        seconds: float = 0.0,
    ) -> None:
        """Make a job route misbehave for its next ``times`` requests (None: until cleared).

        ``route``: ``poll``, ``events`` or ``complete``. ``kind``: ``error`` answers
        ``status`` and stores nothing; ``close`` drops the connection and stores nothing;
        ``drop`` stores, then drops the connection (the answer is lost); ``delay`` waits
        ``seconds``, then handles the request. Only requests that pass the route's own
        checks (signature, provider, job, validation) use a fault up; ``job_id`` limits it to
        one job. Faults are used in the order they were added.
        """
        body = {
            "route": route,
            "kind": kind,
            "times": times,
            "job_id": job_id,
            "status": status,
            "seconds": seconds,
        }
        self._call("POST", "/_test/job_faults", body)

    def clear_job_faults(self) -> None:
        self._call("POST", "/_test/job_faults/clear")

    def ignore_job_poll_limit(self, ignore: bool = True) -> None:
        """A lying server: ``/jobs/poll`` returns every assigned job, whatever ``limit`` says."""
        self._call("POST", "/_test/job_poll_limit", {"ignore": ignore})


def start_control_plane(tmp_dir: Path, *, certfile: Path | None = None) -> ControlPlaneServer:
    """Start the server and wait for READY (10 s); the caller closes it (or uses ``with``)."""
    server = ControlPlaneServer(tmp_dir, certfile=certfile)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
