"""The ``jobs`` and ``job_events`` tables of the control-plane stand-in, and their node routes.

Each node method mirrors one function of ``apps/web/lib/data/node-api.js`` (Infernet Protocol
commit 25377c6; ``shared/reference/infernet-jobs.md`` §4, §7, §8): the same checks in the same
order, the same statuses and error texts, no claim on poll, no state check and no deduplication
on complete. :func:`create_chat` is ``createChatJob`` without the NIM fallback.

Timestamps come back the way PostgREST prints a ``timestamptz``: ISO 8601, microseconds with
trailing zeros trimmed (none when zero) and ``+00:00``.

Test-only state sits beside the rows, never in them: per job, how many ``/complete`` calls were
stored and each one's body, how many event batches were stored, and the most event requests
that were in flight for it at once (a runner must send batches one after another).
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tests.servers import controlplane_router as router
from tests.servers.controlplane_store import Refusal, Store

EVENT_BATCH_MAX = 200
EVENT_TYPES = ("meta", "token", "done", "error")
MAX_JOB_POLL_LIMIT = 25
DEFAULT_JOB_POLL_LIMIT = 5
MAX_ERROR_CHARS = 1024
POLL_COLUMNS = (
    "id",
    "title",
    "type",
    "status",
    "payment_offer",
    "payment_coin",
    "model_name",
    "input_spec",
    "created_at",
)
FAULT_ROUTES = ("poll", "events", "complete")
FAULT_KINDS = ("error", "drop", "close", "delay")
MULTIPLE_ROWS = "JSON object requested, multiple (or no) rows returned"
_MISSING = object()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DropConnection(Exception):
    """Close the connection without an answer (after whatever was stored is stored)."""


def pg_time(us: int) -> str:
    """A ``timestamptz`` as PostgREST returns it, from microseconds since the epoch."""
    sec, frac = divmod(us, 1_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    if frac:
        stamp += "." + f"{frac:06d}".rstrip("0")
    return stamp + "+00:00"


def now_us() -> int:
    return time.time_ns() // 1000


def parse_time_us(text: str) -> int:
    """Microseconds since the epoch of an ISO 8601 text (naive means UTC)."""
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    delta = stamp - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def is_uuid(text: str) -> bool:
    """What Postgres accepts for a ``uuid`` column (hyphens optional, braces allowed)."""
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def poll_limit(limit: Any) -> int:
    """``Math.min(Math.max(Number(limit) || 5, 1), 25)``.

    ``Number(limit) || 5`` turns 0, NaN, null, "" and a missing limit into 5. A fractional
    result is floored here; what PostgREST does with ``limit=2.5`` was not verified.
    """
    number = math.nan if limit is _MISSING else router.js_number(limit)
    wanted = number if number and not math.isnan(number) else DEFAULT_JOB_POLL_LIMIT
    return int(min(max(wanted, 1), MAX_JOB_POLL_LIMIT))


class Jobs:
    """Rows of ``jobs`` and ``job_events`` plus the fault plan of the job routes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lock = store.lock
        self.rows: dict[str, dict[str, Any]] = {}
        self.created_us: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.info: dict[str, dict[str, Any]] = {}
        self.faults: list[dict[str, Any]] = []
        self.ignore_poll_limit = False
        self.rng = random.Random()

    # providers -------------------------------------------------------------------------------

    def providers(self) -> list[dict[str, Any]]:
        return [row for (role, _), row in self.store.rows.items() if role == "provider"]

    def provider(self, pubkey: str) -> dict[str, Any]:
        """``providers … .eq("public_key", pubkey).maybeSingle()``, as the job routes do it."""
        mine = [row for row in self.providers() if row.get("public_key") == pubkey]
        if len(mine) > 1:
            raise Refusal(500, MULTIPLE_ROWS)
        if not mine:
            raise Refusal(404, "no provider row for this pubkey")
        return mine[0]

    def _job(self, job_id: str) -> dict[str, Any]:
        """``jobs … .eq("id", jobId).maybeSingle()``: a non-uuid id is a Postgres error (500)."""
        if not is_uuid(job_id):
            raise Refusal(500, f'invalid input syntax for type uuid: "{job_id}"')
        row = self.rows.get(str(uuid.UUID(job_id)))
        if row is None:
            raise Refusal(404, "job not found")
        return row

    def _owned(self, pubkey: str, job_id: str) -> dict[str, Any]:
        if not job_id:
            raise Refusal(400, "jobId is required")
        provider = self.provider(pubkey)
        row = self._job(job_id)
        if row["provider_id"] != provider["id"]:
            raise Refusal(403, "job not assigned to this provider")
        return row

    # faults ----------------------------------------------------------------------------------

    def add_fault(self, body: dict[str, Any]) -> dict[str, Any]:
        route, kind = body.get("route"), body.get("kind")
        if route not in FAULT_ROUTES or kind not in FAULT_KINDS:
            raise Refusal(400, f"route must be one of {FAULT_ROUTES}, kind one of {FAULT_KINDS}")
        times = body.get("times", 1)
        fault = {
            "route": route,
            "kind": kind,
            "times": None if times is None else int(times),
            "job_id": body.get("job_id"),
            "status": int(body.get("status") or 500),
            "seconds": float(body.get("seconds") or 0.0),
            "hits": 0,
        }
        with self.lock:
            self.faults.append(fault)
        return dict(fault)

    def take_fault(self, route: str, job_id: str | None) -> dict[str, Any] | None:
        """The first fault planned for this request, used up once."""
        with self.lock:
            for fault in self.faults:
                if fault["route"] != route or fault["times"] == 0:
                    continue
                if fault["job_id"] is not None and fault["job_id"] != job_id:
                    continue
                if fault["times"] is not None:
                    fault["times"] -= 1
                fault["hits"] += 1
                return dict(fault)
        return None

    def _apply(self, fault: dict[str, Any] | None, what: str) -> None:
        """Faults that act before the store changes: error, close, delay."""
        if fault is None:
            return
        if fault["kind"] == "error":
            raise Refusal(fault["status"], f"test fault: {what} failed")
        if fault["kind"] == "close":
            raise DropConnection(f"{what}: connection closed before storing (fault)")
        if fault["kind"] == "delay":
            time.sleep(fault["seconds"])

    # node routes -----------------------------------------------------------------------------

    def poll(self, pubkey: str, limit: Any = _MISSING) -> dict[str, Any]:
        """``pollJobsForNode``: assigned jobs of the caller, oldest first; claims nothing."""
        safe = poll_limit(limit)
        with self.lock:
            provider = self.provider(pubkey)
        fault = self.take_fault("poll", None)
        self._apply(fault, "poll")
        with self.lock:
            mine = [
                row
                for row in self.rows.values()
                if row["provider_id"] == provider["id"] and row["status"] == "assigned"
            ]
            mine.sort(key=lambda row: self.created_us[row["id"]])  # stable: ties by insertion
            handed = mine if self.ignore_poll_limit else mine[:safe]
            jobs = [{column: _copy(row[column]) for column in POLL_COLUMNS} for row in handed]
        if fault is not None and fault["kind"] == "drop":
            raise DropConnection("poll answer dropped (fault)")
        return {"provider_id": provider["id"], "jobs": jobs}

    def emit(self, pubkey: str, job_id: str, events: Any) -> dict[str, Any]:
        """``emitJobEvents``: validate, then insert every row at once with increasing ids."""
        if not job_id:
            raise Refusal(400, "jobId is required")
        if not isinstance(events, list) or not events:
            raise Refusal(400, "events must be a non-empty array")
        if len(events) > EVENT_BATCH_MAX:
            raise Refusal(400, f"too many events (max {EVENT_BATCH_MAX})")
        with self.lock:
            row = self._owned(pubkey, job_id)
            key = row["id"]
            info = self.info[key]
            info["events_inflight"] += 1
            info["events_inflight_max"] = max(info["events_inflight_max"], info["events_inflight"])
        try:
            rows = []
            for event in events:
                # The JS check is `!e || typeof e !== "object"`: an array passes it, then fails
                # on its missing event_type like any other bad item.
                kind = event.get("event_type") if isinstance(event, dict) else None
                if not isinstance(kind, str) or kind not in EVENT_TYPES:
                    raise Refusal(
                        400, f"invalid event_type (must be one of {', '.join(EVENT_TYPES)})"
                    )
                data = event.get("data")
                rows.append((kind, {} if data is None else data))
            fault = self.take_fault("events", key)
            self._apply(fault, "events insert")
            with self.lock:
                created = pg_time(now_us())  # now() is the transaction's time: one per batch
                for kind, data in rows:
                    self.events.append(
                        {
                            "id": NEXT_EVENT_ID(),
                            "job_id": key,
                            "event_type": kind,
                            "data": data,
                            "created_at": created,
                        }
                    )
                info["event_batches"] += 1
            if fault is not None and fault["kind"] == "drop":
                raise DropConnection("events stored, answer dropped (fault)")
            return {"inserted": len(rows)}
        finally:
            with self.lock:
                info["events_inflight"] -= 1

    def complete(self, pubkey: str, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``completeJobForNode``: no state check, no deduplication; every call is stored."""
        with self.lock:
            key = self._owned(pubkey, job_id)["id"]
        fault = self.take_fault("complete", key)
        self._apply(fault, "complete")
        with self.lock:
            row = self.rows[key]
            stamp = pg_time(now_us())
            failed = body.get("status") == "failed"
            row.update(status="failed" if failed else "completed", updated_at=stamp)
            row["completed_at"] = stamp
            if not failed and "result" in body:
                row["result"] = body["result"]
            error = body.get("error")
            if failed and isinstance(error, str):
                row["error"] = router.js_slice(error, MAX_ERROR_CHARS)
            info = self.info[key]
            info["complete_calls"] += 1
            info["completions"].append({"body": body, "time": time.time()})
            answer = {"id": key, "status": row["status"]}
        if fault is not None and fault["kind"] == "drop":
            raise DropConnection("complete stored, answer dropped (fault)")
        return answer

    # test side -------------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Insert a job row; assigned to ``pubkey``'s provider when one is given."""
        messages = body.get("messages")
        if messages is None:
            messages = [{"role": "user", "content": "Say hello."}]
        spec = body.get("input_spec")
        if spec is None:
            spec = {
                "messages": messages,
                "max_tokens": body.get("max_tokens", 512),
                "temperature": body.get("temperature", 0.7),
            }
        stamp = now_us()
        created = stamp
        if isinstance(body.get("created_at"), str):
            created = parse_time_us(body["created_at"])
        elif body.get("age_s") is not None:
            created = stamp - int(float(body["age_s"]) * 1_000_000)
        with self.lock:
            provider = None
            if body.get("pubkey") is not None:
                provider = self.provider(str(body["pubkey"]))
            status = body.get("status") or ("assigned" if provider else "pending")
            return self._insert(
                title=body["title"] if isinstance(body.get("title"), str) else None,
                messages=spec.get("messages") if isinstance(spec, dict) else None,
                kind=str(body.get("type") or "chat"),
                status=str(status),
                provider=provider,
                model_name=body.get("model_name"),
                input_spec=spec,
                payment_offer=body.get("payment_offer", 0),
                payment_coin=body.get("payment_coin"),
                created=created,
                now=stamp,
            )

    def create_many(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert several jobs at once: no poll sees some of them without the others."""
        with self.lock:
            return [self.create(body) for body in bodies]

    def _insert(
        self,
        *,
        title: str | None,
        messages: Any,
        kind: str,
        status: str,
        provider: dict[str, Any] | None,
        model_name: Any,
        input_spec: Any,
        payment_offer: Any,
        payment_coin: Any,
        created: int,
        now: int,
    ) -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        row = {
            "id": job_id,
            "title": title if title is not None else router.chat_title(messages),
            "status": status,
            "payment_offer": payment_offer,
            "model_name": model_name,
            "client_name": None,
            "created_at": pg_time(created),
            "type": kind,
            "client_id": None,
            "provider_id": provider["id"] if provider else None,
            "aggregator_id": None,
            "input_spec": input_spec,
            "result": None,
            "error": None,
            "payment_coin": payment_coin,
            "payment_tx_hash": None,
            "payment_status": "unpaid",
            "payment_invoice": None,
            "updated_at": pg_time(now),
            "assigned_at": pg_time(now) if provider else None,
            "completed_at": None,
        }
        self.rows[job_id] = row
        self.created_us[job_id] = created
        self.info[job_id] = {
            "complete_calls": 0,
            "completions": [],
            "event_batches": 0,
            "events_inflight": 0,
            "events_inflight_max": 0,
        }
        return self.view(job_id)

    def assign(self, job_id: str, pubkey: str) -> dict[str, Any]:
        """Give a job to ``pubkey``'s provider: ``assigned``, ``assigned_at`` now."""
        with self.lock:
            row = self._job(job_id)
            provider = self.provider(pubkey)
            stamp = pg_time(now_us())
            row.update(provider_id=provider["id"], status="assigned", assigned_at=stamp)
            row["updated_at"] = stamp
            return self.view(row["id"])

    def view(self, job_id: str) -> dict[str, Any]:
        """The row plus the test-only counters (see the module docstring)."""
        with self.lock:
            row = self._job(job_id)
            info = self.info[row["id"]]
            owner = next((p for p in self.providers() if p["id"] == row["provider_id"]), None)
            return _copy_row(row) | {
                "complete_calls": info["complete_calls"],
                "completions": _copy(info["completions"]),
                "event_batches": info["event_batches"],
                "events_inflight_max": info["events_inflight_max"],
                "provider_node_id": owner["node_id"] if owner else None,
                "provider_pubkey": owner["public_key"] if owner else None,
            }

    def all(self) -> list[dict[str, Any]]:
        with self.lock:
            keys = sorted(self.rows, key=lambda key: self.created_us[key])
            return [self.view(key) for key in keys]

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            key = self._job(job_id)["id"]
            return [_copy(e) for e in self.events if e["job_id"] == key]  # appended in id order

    def pick(
        self, model_name: Any, *, seed: Any = None, draw: Any = None
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """``pickChatProvider``: the chosen provider row (or None) and every candidate."""
        rng: Callable[[], float]
        if draw is not None:
            value = float(draw)
            rng = lambda: value  # noqa: E731
        elif seed is not None:
            rng = random.Random(seed).random
        else:
            rng = self.rng.random
        with self.lock:
            kept = router.candidates(self.providers(), model_name, time.time())
            return router.weighted_pick(kept, rng), kept

    def create_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """``createChatJob`` without NIM: ``{job, provider, source: "p2p"|"none"}``."""
        model_name = body.get("model_name")
        messages = body.get("messages")
        with self.lock:
            provider, _ = self.pick(model_name, seed=body.get("seed"), draw=body.get("draw"))
            stamp = now_us()
            job = self._insert(
                title=None,
                messages=messages,
                kind="chat",
                status="assigned" if provider else "pending",
                provider=provider,
                model_name=model_name,
                input_spec={
                    "messages": messages,
                    "max_tokens": body.get("max_tokens", 512),
                    "temperature": body.get("temperature", 0.7),
                },
                payment_offer=0,
                payment_coin=None,
                created=stamp,
                now=stamp,
            )
            return {
                "job": job,
                "provider": _copy(provider),
                "source": "p2p" if provider else "none",
            }

    # providers for routing tests -------------------------------------------------------------

    def add_provider(self, body: dict[str, Any]) -> dict[str, Any]:
        """A provider row as register + heartbeat would leave it, without any signing."""
        node_id = str(body.get("node_id") or f"peer-{uuid.uuid4().hex[:8]}")
        with self.lock:
            if ("provider", node_id) in self.store.rows:
                raise Refusal(400, f"provider {node_id} exists")
            row: dict[str, Any] = {
                "id": str(uuid.uuid4()),
                "node_id": node_id,
                "public_key": str(body.get("pubkey") or uuid.uuid4().hex + uuid.uuid4().hex),
                "name": node_id,
                "status": "available",
                "reputation": 50,
            }
            self.store.rows[("provider", node_id)] = row
            return self._update(row, body)

    def update_provider(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self._update(self.provider(str(body.get("pubkey"))), body)

    def _update(self, row: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        for field in ("name", "status", "reputation", "specs"):
            if field in body:
                row[field] = body[field]
        if body.get("last_seen_age_s") is not None or "last_seen" not in row:
            age = float(body.get("last_seen_age_s") or 0.0)
            seen = datetime.fromtimestamp(time.time() - age, tz=UTC)
            row["last_seen"] = seen.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return _copy_row(row)


def _copy(value: Any) -> Any:
    """A deep copy of decoded JSON (rows leave the lock as copies)."""
    if isinstance(value, dict):
        return _copy_row(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _copy_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) for k, v in row.items()}


class Counter:
    """``bigserial``: ids only grow, across resets too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


NEXT_EVENT_ID = Counter()


def test_route(jobs: Jobs, method: str, path: str, body: dict[str, Any]) -> Any:
    """The unsigned ``/_test/`` routes of the job tables (see the harness for each one)."""
    parts = path.split("?", 1)[0].strip("/").split("/")  # ["_test", "jobs", id, ...]
    head = parts[1]
    if head == "jobs" and len(parts) == 2:
        return jobs.all() if method == "GET" else jobs.create(body)
    if head == "jobs" and len(parts) == 3:
        return jobs.view(parts[2])
    if head == "jobs" and len(parts) == 4 and parts[3] == "events":
        return jobs.job_events(parts[2])
    if head == "jobs" and len(parts) == 4 and parts[3] == "assign":
        return jobs.assign(parts[2], str(body.get("pubkey")))
    if head == "job_batch" and len(parts) == 2:
        return jobs.create_many(list(body.get("jobs") or []))
    if head == "chats" and len(parts) == 2:
        return jobs.create_chat(body)
    if head == "pick" and len(parts) == 2:
        seed, draw = body.get("seed"), body.get("draw")
        chosen, kept = jobs.pick(body.get("model_name"), seed=seed, draw=draw)
        return {
            "provider": _copy(chosen),
            "candidates": [
                {"node_id": p["node_id"], "public_key": p["public_key"], "weight": router.weight(p)}
                for p in kept
            ],
        }
    if head == "providers" and len(parts) == 2:
        return jobs.add_provider(body)
    if head == "providers" and parts[2:] == ["update"]:
        return jobs.update_provider(body)
    if head == "job_faults" and len(parts) == 2:
        return jobs.add_fault(body)
    if head == "job_faults" and parts[2:] == ["clear"]:
        with jobs.lock:
            jobs.faults.clear()
        return {}
    if head == "job_poll_limit" and len(parts) == 2:
        jobs.ignore_poll_limit = bool(body.get("ignore"))
        return {}
    raise Refusal(404, f"no test route {path}")
