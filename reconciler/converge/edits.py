"""``model install`` and ``model remove``, from the command line and from the dashboard.

Both edit ``infernet.yaml`` under the node lock (comments kept: ``config.edit``) and then
reconcile, so the file stays the single truth. The rules live here once: which backend and
which entry a name means, what is refused (names, protection, where a remote name may point),
the edit itself, and taking a failed install back out of the file: byte for byte when nobody
touched the file since, kept in the state store first for a remote command (a crash must not
leave the install in the file). The CLI (``cli.commands``) and the remote verbs
(``daemon.verbs``) only adapt their input and output.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import backends, names
from reconciler.config import edit as configedit
from reconciler.controlplane.args import NO_HF, model_problem, name_problem
from reconciler.errors import InfernetError, InvalidModelName, PlanError, one_line
from reconciler.files import write_atomically
from reconciler.limits import ANSWER_TEXT, SHOWN_NAME
from reconciler.model import FOREVER, BackendKind, Desired, ModelKey, ModelSpec
from reconciler.redact import redact
from state import StatusKey, Store

log = logging.getLogger("infernet.commands")

Entry = str | dict[str, Any]
"""A ``served_models`` entry as ``config.edit.add_model`` takes it."""

# --------------------------------------------------------------------------- installs


@dataclass(frozen=True)
class Install:
    """What an install adds: the entry, its backend, the name it will be advertised as, and
    the file's entry that already is this model (None when the install adds one)."""

    entry: Entry
    backend: BackendKind
    advertised: str
    existing: ModelSpec | None = None


def backend_for(
    current: Desired, name: str, given: str | None, *, source: str | None = None
) -> BackendKind:
    """The backend of a ``model install``: ``--backend``, else the backend of the file's entry
    ``name`` refers to, else the kind whose driver claims the name by its look (a ``*.gguf``
    file is llama.cpp's), else, with a ``source``, the first kind that downloads from one,
    else the file's default."""
    if given:
        return BackendKind(given)
    for spec in current.models:
        if names.refers_to(spec, name):
            return spec.backend
    for driver in backends.drivers():
        if driver.claims is not None and driver.claims(name):
            return driver.kind
    if source is not None:
        for driver in backends.drivers():
            if driver.source_refusal is None:
                return driver.kind
    return current.default_backend


_SCHEMES = ("hf://", "https://", "http://", "file://")  # the schema's pattern for source:
_SHA256 = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$")
# org/repo (optionally @revision) with a capital letter: HuggingFace's spelling. An Ollama
# name has a tag or is lower case, and a registry host has a dot (hf.co/org/repo is Ollama's).
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w-]*/[A-Za-z0-9][\w.-]*(@[\w.-]+)?$")


def looks_like_hf_repo(name: str) -> bool:
    """Whether ``name`` reads as a HuggingFace repository id (``Qwen/Qwen2.5-14B-Instruct``)
    rather than an Ollama ``namespace/model``."""
    return bool(_HF_REPO.match(name)) and name != name.lower()


def local_install(
    current: Desired,
    name: str,
    given: str | None,
    *,
    pin: bool,
    source: str | None = None,
    sha256: str | None = None,
) -> Install:
    """A ``model install`` from the node's shell: the bare name when every default holds, else
    a mapping saying the backend, ``keep_alive: forever`` (``pin``) and where the file comes
    from (``source``, checked by ``sha256``). Flags that can't work are refused here, before
    the file is touched (``PlanError``, one line saying what to do)."""
    if sha256 is not None and source is None:
        raise PlanError("--sha256 checks a downloaded file: give its --source URL too")
    if sha256 is not None and not _SHA256.match(sha256):
        raise PlanError(f"--sha256 {sha256[:80]!r} is not a SHA-256: give its 64 hex digits")
    if source is not None and not source.startswith(_SCHEMES):
        raise PlanError(
            f"--source {redact(source)!r} is not a URL infernet downloads from: use "
            "hf://org/repo/file.gguf, https://…, http://… or file:///…"
        )
    backend = backend_for(current, name, given, source=source)
    named = given is not None or any(names.refers_to(m, name) for m in current.models)
    if not named and backend is BackendKind.OLLAMA and looks_like_hf_repo(name):
        engines = [d.kind.value for d in backends.drivers() if d.revisions]
        hint = engines[0] + (f" (or {', '.join(engines[1:])})" if engines[1:] else "")
        raise PlanError(
            f"{name} looks like a HuggingFace repo id: add --backend {hint}; for an Ollama "
            "model of that name, add --backend ollama"
        )
    if source is not None:
        refusal = backends.driver(backend).source_refusal
        if refusal is not None:
            raise PlanError(f"--source: {refusal.format(kind=backend.value)}")
        listed_as = next((m for m in current.models if names.refers_to(m, name, backend)), None)
        if listed_as is not None and listed_as.source != source:
            raise PlanError(
                f"{name} is already in the file with another source; change its source: there"
            )
    entry: Entry = name
    if pin or source is not None or backend is not current.default_backend:
        entry = {"name": name}
        if backend is not current.default_backend:
            entry["backend"] = backend.value
        if source is not None:
            entry["source"] = source
        if sha256 is not None:
            entry["sha256"] = sha256
        if pin:
            entry["keep_alive"] = "forever"
    return Install(entry, backend, name)


def remote_install(args: dict[str, Any], current: Desired) -> Install | str:
    """A ``model_install`` command's install, or why it is refused.

    It installs on the default backend; ``args.hf`` (or ``args.model`` spelt ``hf:org/repo``)
    names a HuggingFace repository to serve under ``args.model``. Every name is checked
    strictly (``controlplane.args``), and against where the driver lets a remote name point.
    A model the file has already (same model, or the same advertised name) is not added again.
    """
    model = args.get("model")
    hf = args.get("hf")
    if hf is None and isinstance(model, str) and model.startswith("hf:"):
        hf = model[3:]  # Infernet's own spelling of "the HF repo, served under this name"
    backend = current.default_backend
    driver = backends.driver(backend)
    if hf is None:
        problem = model_problem(model, backend)
        if problem is None and not driver.revisions and looks_like_hf_repo(str(model)):
            # Answered before the registry is asked, as `model install` does at the node.
            problem = (
                f"args.model '{one_line(str(model), SHOWN_NAME, mark='')}' looks like a "
                f"HuggingFace repo id; this node installs {backend.value} models: send a "
                "model:tag its registry lists"
            )
        if problem is None and driver.remote_install_problem is not None:
            assert isinstance(model, str)
            problem = driver.remote_install_problem(model, current)
        if problem is not None:
            return problem
        assert isinstance(model, str)
        entry: Entry = model
    else:
        problem = name_problem(model) or name_problem(hf, field="hf")
        if problem is not None:
            return problem
        assert isinstance(model, str) and isinstance(hf, str)
        if not driver.revisions:  # HuggingFace repositories are the kinds with revisions
            return NO_HF
        reason = names.is_valid(backend, hf)
        if reason is not None:
            return f"args.hf: {reason}"
        entry = {"name": hf, "backend": backend.value, "advertise_as": model}
    wanted = names.key(backend, names.canonical(backend, entry_name(entry)))
    existing = next(
        (
            m
            for m in current.models
            if names.key(m.backend, m.canonical) == wanted or m.advertise_as == model
        ),
        None,
    )
    return Install(entry, backend, model, existing)


@dataclass(frozen=True)
class Edit:
    """What an edit of the file changed: its bytes before and after."""

    path: Path
    before: bytes
    after: bytes

    @property
    def changed(self) -> bool:
        return self.before != self.after


def add(
    path: Path,
    install: Install,
    *,
    pin: bool = False,
    before_write: configedit.BeforeWrite | None = None,
) -> Edit:
    """Add the install's entry to the file; when the model is there already and ``pin``, set
    its ``keep_alive`` to forever instead. The caller holds the node lock."""
    before = path.read_bytes()
    added = configedit.add_model(path, install.entry, before_write=before_write)
    if not added and pin:
        name = entry_name(install.entry)
        configedit.set_keep_alive(path, name, FOREVER, backend=install.backend)
    return Edit(path, before, path.read_bytes())


def entry_name(entry: Entry) -> str:
    return entry if isinstance(entry, str) else str(entry["name"])


# --------------------------------------------------------------------------- removals


@dataclass(frozen=True)
class Removal:
    """What a removal of ``name`` means: the file's entries it refers to, their keys (the
    default backend's key of ``name`` when it refers to none; ``invalid`` says why there is
    none when ``name`` is no model name there), and whether a protection forbids it: an entry
    declared ``protect: true``, or a key still protected after it left the file
    (``remembered``)."""

    matched: tuple[ModelSpec, ...]
    keys: frozenset[ModelKey]
    protected: ModelSpec | None = None
    remembered: bool = False
    invalid: str | None = None


def removal(
    current: Desired,
    name: str,
    backend: BackendKind | None = None,
    *,
    remembered: Collection[str] = (),
) -> Removal:
    """The removal of ``name`` (``backend`` narrows which entries)."""
    matched = tuple(m for m in current.models if names.refers_to(m, name, backend))
    if matched:
        keys = frozenset(names.key(m.backend, m.canonical) for m in matched)
    else:
        default = current.default_backend
        try:
            keys = frozenset({names.key(default, names.canonical(default, name))})
        except InvalidModelName as exc:
            return Removal((), frozenset(), invalid=str(exc))
    guarded = next((m for m in matched if m.protect), None)
    return Removal(matched, keys, guarded, bool(keys & set(remembered)))


def remove(path: Path, name: str, backend: BackendKind | None) -> Edit:
    """Take every entry ``name`` refers to out of the file; the caller holds the node lock."""
    before = path.read_bytes()
    configedit.remove_model(path, name, backend)
    return Edit(path, before, path.read_bytes())


# --------------------------------------------------------------------------- taking it back


def unchanged_since(path: Path, after_sha256: str) -> bool:
    """Whether the file still holds exactly what an edit wrote (a digest of it): only then is
    it put back byte for byte; when someone changed it since, their edit wins."""
    return hashlib.sha256(path.read_bytes()).hexdigest() == after_sha256


def keep_undo(
    store: Store, command_id: str, before: bytes, after: bytes, *, name: str, backend: BackendKind
) -> None:
    """Keep what takes the edit of install ``command_id`` back, before the file changes."""
    undo = dict(store.get_status(StatusKey.COMMAND_UNDO) or {})
    undo[command_id] = {
        "before": base64.b64encode(before).decode("ascii"),
        "after_sha256": hashlib.sha256(after).hexdigest(),
        "name": name,
        "backend": backend.value,
    }
    store.put_status(StatusKey.COMMAND_UNDO, undo)


def drop_undo(store: Store, command_id: str) -> None:
    """The install ``command_id`` stands: forget how to take it back."""
    undo = dict(store.get_status(StatusKey.COMMAND_UNDO) or {})
    if undo.pop(command_id, None) is not None:
        store.put_status(StatusKey.COMMAND_UNDO, undo)


def undo_edit(store: Store, config_path: Path, command_id: str) -> str:
    """Take the file edit of install ``command_id`` back; the caller holds the node lock.

    The file gets its bytes from before the edit back when it is exactly as the edit left it.
    When someone changed it since, their changes stay and only the added entry is removed.
    Returns "" when done (or there was nothing to undo), else a note for the answer.
    """
    undo = (store.get_status(StatusKey.COMMAND_UNDO) or {}).get(command_id)
    if not isinstance(undo, dict):
        return ""
    name = str(undo.get("name", ""))
    note = ""
    try:
        if unchanged_since(config_path, str(undo.get("after_sha256"))):
            write_atomically(config_path, base64.b64decode(undo.get("before", "")))
        elif name:
            configedit.remove_model(config_path, name, BackendKind(undo.get("backend", "ollama")))
    except (OSError, ValueError, InfernetError) as exc:
        log.error("could not take %s back out of %s: %s", name, config_path, exc)
        reason = one_line(str(exc), ANSWER_TEXT)
        note = f"; infernet.yaml still lists {name} (could not revert: {reason})"
    drop_undo(store, command_id)
    return note


def undo_pending(store: Store) -> list[str]:
    """Ids of installs whose edit is still kept, to take back or forget."""
    return list(store.get_status(StatusKey.COMMAND_UNDO) or {})
