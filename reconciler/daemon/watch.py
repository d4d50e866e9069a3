"""The file in force: watching it, re-reading it, and keeping its last valid version.

An invalid, empty, half-written or deleted file never triggers an action: the last valid desired
state stays in force (it is kept in the state store, so a restart keeps it too).
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Any

from reconciler.config import desired as desired_mod
from reconciler.converge.session import Session, keep_last_valid, load_or_last_valid
from reconciler.daemon.metrics import Metrics
from reconciler.errors import ConfigError, InfernetError, one_line
from reconciler.limits import DETAIL_TEXT
from reconciler.model import Desired
from state import StatusKey, Store

log = logging.getLogger("infernet.daemon")

DEBOUNCE = 0.1  # quiet time that ends a burst of file events
DEBOUNCE_MAX = 1.0  # a storm of saves still reconciles at least once a second


class Watching:
    """The daemon's config file (a part of ``Daemon``)."""

    config_path: Path
    state_dir: Path
    wake: queue.SimpleQueue[str]
    session: Session | None
    metrics: Metrics
    config_error: str | None
    _observer: Any
    _runner_stale: bool
    _retired: list[Any]

    def _status(self, *, running: bool = True) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        """watchdog on the file's folder, and its symlink target's folder (git checkouts)."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watched = {self.config_path.absolute(), self.config_path.resolve()}
        names = {str(p) for p in watched}
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Opens and read-only closes are our own reads of the file: waking on them
                # would re-read it forever.
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
                if paths & names:
                    daemon.wake.put("file")

        self._observer = Observer()
        for folder in {p.parent for p in watched}:
            self._observer.schedule(Handler(), str(folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _debounce(self) -> None:
        """Swallow a burst of file events: wait until quiet (bounded), keep other wake-ups."""
        deadline = time.monotonic() + DEBOUNCE_MAX
        others: list[str] = []
        while time.monotonic() < deadline:
            try:
                reason = self.wake.get(timeout=DEBOUNCE)
            except queue.Empty:
                break
            if reason != "file":
                others.append(reason)
        for reason in others:
            self.wake.put(reason)

    def _load_initial(self) -> Desired:
        """The file, or the last valid one kept in the store when the file is broken now."""
        try:
            first, self.config_error = load_or_last_valid(self.config_path, self.state_dir)
        except InfernetError:
            raise  # nothing valid was ever kept (or no store): there is nothing to serve
        except Exception as exc:  # the validator itself failed on this file: keep the last
            first, self.config_error = self._kept(_unusable(self.config_path, exc))
        if self.config_error:
            log.error("%s; using the last valid version kept in the state store", self.config_error)
        return first

    def _kept(self, message: str) -> tuple[Desired, str]:
        """The last valid text ``watch`` kept, with why the file is not used."""
        with Store.open(self.state_dir) as store:
            kept = store.get_status(StatusKey.LAST_VALID)
        if not isinstance(kept, dict) or not isinstance(kept.get("text"), str):
            raise ConfigError(message)
        return desired_mod.parse(kept["text"], path=str(self.config_path)), message

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file; True when a new valid desired state is now in force."""
        assert self.session is not None
        try:
            fresh = desired_mod.load(self.config_path)
        except Exception as exc:
            # A validator's own failure on this text counts like an invalid file: it must not
            # take the desired state in force (or the daemon) with it.
            if isinstance(exc, ConfigError):
                message = str(exc).splitlines()[0]
            else:
                message = _unusable(self.config_path, exc)
            if message != self.config_error:
                log.error("%s; the last valid desired state stays in force", message)
            self.config_error = message
            self.session.config_error = message
            self.metrics.config_valid(False)
            self._status()
            return False
        self.config_error = None
        self.session.config_error = None
        self.metrics.config_valid(True)
        if not force and fresh.source.sha256 == self.session.desired.source.sha256:
            return False
        before = self.session.heartbeater
        self.session = self.session.with_desired(fresh, retired=self._retired)
        if self.session.heartbeater is not before:
            # The command runner holds the old heartbeater's client; it may be answering a
            # command with it right now (this reload can come from that command's reconcile).
            self._runner_stale = True
        return True

    def _keep_valid(self) -> None:
        """Keep the text of the desired state in force, for a restart while the file is broken
        (``keep_last_valid``; every apply and reconcile keeps it too, under the node lock)."""
        assert self.session is not None
        keep_last_valid(self.session.store, self.session.desired)

    # ------------------------------------------------------------------ acting


def _unusable(path: Path, exc: Exception) -> str:
    detail = one_line(str(exc), DETAIL_TEXT, mark="")
    return (
        f"{path}: could not be checked (internal error {type(exc).__name__}: {detail}); "
        "please report it with the file"
    )
