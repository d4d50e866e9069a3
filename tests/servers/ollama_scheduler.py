"""The runner scheduler (`server/sched.go`, ≥0.30 fit rule), without any real inference.

Runners are keyed by weights digest and carry one ``sessionDuration`` that every request with
a keep_alive overwrites. Most requests finish immediately (:meth:`Scheduler.use`), so a runner
is idle as soon as the call returns and its expiry timer starts then; a streamed chat holds
its runner (:meth:`Scheduler.acquire` … :meth:`Scheduler.release`) and one of its
``OLLAMA_NUM_PARALLEL`` slots while it generates, so requests beyond the slots queue. A load
that does not fit ``--vram-bytes`` evicts idle runners, shortest duration first; so does the
loaded-runner cap.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.servers.ollama_gojson import MAX_DURATION_NS
from tests.servers.ollama_store import LocalModel

GIB = 1 << 30


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


@dataclass
class Runner:
    key: str
    path: str
    name: str
    digest: str
    details: dict[str, Any]
    size: int
    size_vram: int
    session_ns: int
    num_ctx: int
    expires_ns: int = 0
    refcount: int = 0
    loaded_ns: int = field(default_factory=time.time_ns)
    # One per parallel sequence (OLLAMA_NUM_PARALLEL): a chat generates only while it holds one.
    slots: threading.Semaphore = field(default_factory=threading.Semaphore, repr=False)

    def expires_at_ns(self) -> int:
        return self.expires_ns or time.time_ns() + self.session_ns


class Scheduler:
    def __init__(self, vram_bytes: int, default_keep_alive_ns: int) -> None:
        self.vram = vram_bytes
        self.default_keep_alive = default_keep_alive_ns
        self.max_runners = _env_int("OLLAMA_MAX_LOADED_MODELS", 0) or 3
        self.num_parallel = _env_int("OLLAMA_NUM_PARALLEL", 0) or 1
        self.context_env = _env_int("OLLAMA_CONTEXT_LENGTH", 0)
        self._cond = threading.Condition()
        self._runners: dict[str, Runner] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._expiry_loop, daemon=True)
        self._thread.start()

    def default_num_ctx(self) -> int:
        """Default num_ctx, tiered by total VRAM as in ≥0.15.5."""
        if self.context_env > 0:
            return self.context_env
        if self.vram >= 47 * GIB:
            return 262144
        return 32768 if self.vram >= 23 * GIB else 4096

    def num_ctx(self, model: LocalModel, requested: int | None) -> int:
        ctx = requested or self.default_num_ctx()
        trained = model.kv_int("context_length")
        if trained:
            ctx = min(ctx, trained)
        return max(ctx, 4)

    def predict(self, model: LocalModel, num_ctx: int) -> int:
        """`PredictServerVRAM`: GGUF file size + 2·blocks·kv_heads·(embd/heads)·ctx·2 bytes."""
        embedding = "embedding" in model.capabilities()
        ctx = num_ctx * (1 if embedding else self.num_parallel)
        heads = model.kv_int("attention.head_count")
        kv_heads = model.kv_int("attention.head_count_kv") or heads
        head_dim = model.kv_int("embedding_length") // heads if heads else 0
        kv = 2 * model.kv_int("block_count") * kv_heads * head_dim * ctx * 2
        extra = sum(p.stat().st_size for p in model.projectors if p.exists())
        return model.weights_size + extra + kv

    def use(
        self, model: LocalModel, name: str, keep_alive_ns: int | None, num_ctx: int | None
    ) -> Runner:
        """Schedule one request on the model's runner (loading it if needed); it ends at once."""
        runner = self.acquire(model, name, keep_alive_ns, num_ctx)
        self.release(runner)
        return runner

    def acquire(
        self, model: LocalModel, name: str, keep_alive_ns: int | None, num_ctx: int | None
    ) -> Runner:
        """Schedule a request that stays in flight until :meth:`release` (no expiry meanwhile)."""
        with self._cond:
            runner = self._runners.get(model.weights_digest)
            if runner is not None and runner.num_ctx != self.num_ctx(model, num_ctx):
                self._unload(runner)
                runner = None
            if runner is None:
                session = self.default_keep_alive if keep_alive_ns is None else keep_alive_ns
                runner = self._load(model, name, session, self.num_ctx(model, num_ctx))
            elif keep_alive_ns is not None:
                runner.session_ns = keep_alive_ns
            runner.refcount += 1
            return runner

    def release(self, runner: Runner) -> None:
        """The request is over: the last one out starts the expiry timer (or unloads)."""
        with self._cond:
            runner.refcount = max(0, runner.refcount - 1)
            if runner.refcount == 0 and self._runners.get(runner.key) is runner:
                self._finish(runner)

    def _load(self, model: LocalModel, name: str, session: int, num_ctx: int) -> Runner:
        size = self.predict(model, num_ctx)
        while self._runners:
            free = self.vram - sum(r.size_vram for r in self._runners.values())
            if len(self._runners) < self.max_runners and size <= 0.8 * free:
                break
            self._unload(self._victim())
        runner = Runner(
            key=model.weights_digest,
            path=str(model.weights_path),
            name=name,
            digest=model.manifest.digest,
            details=model.details(),
            size=size,
            size_vram=min(size, self.vram),
            session_ns=session,
            num_ctx=num_ctx,
            slots=threading.Semaphore(self.num_parallel),
        )
        self._runners[runner.key] = runner
        return runner

    def _victim(self) -> Runner:
        ordered = sorted(self._runners.values(), key=lambda r: (r.session_ns, r.path))
        idle = [r for r in ordered if r.refcount == 0]
        return (idle or ordered)[0]

    def _finish(self, runner: Runner) -> None:
        if runner.session_ns <= 0:
            self._unload(runner)
            return
        runner.expires_ns = time.time_ns() + runner.session_ns
        self._cond.notify_all()

    def _unload(self, runner: Runner) -> None:
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]
        self._cond.notify_all()

    def expire(self, model: LocalModel) -> None:
        """`expireRunner`: unload now, or when the requests in flight are done."""
        with self._cond:
            runner = self._runners.get(model.weights_digest)
            if runner is None:
                return
            if runner.refcount > 0:
                runner.session_ns = 0
            else:
                self._unload(runner)

    def evict(self, match: str, weights: str | None) -> bool:
        """Unload the runner loaded under ``match`` (case-insensitive) or holding ``weights``."""
        with self._cond:
            for runner in list(self._runners.values()):
                if runner.key == weights or runner.name.lower() == match.lower():
                    self._unload(runner)
                    return True
        return False

    def ps(self) -> list[Runner]:
        with self._cond:
            runners = list(self._runners.values())
        return sorted(runners, key=lambda r: -(r.expires_at_ns() // 1_000_000_000))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _expiry_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.time_ns()
                for runner in list(self._runners.values()):
                    if runner.refcount == 0 and 0 < runner.expires_ns <= now:
                        self._unload(runner)
                pending = [
                    r.expires_ns
                    for r in self._runners.values()
                    if r.expires_ns and r.session_ns < MAX_DURATION_NS
                ]
                timeout = (min(pending) - now) / 1e9 if pending else None
                self._cond.wait(timeout if timeout is None else max(timeout, 0.001))
