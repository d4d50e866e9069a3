"""``infernet.yaml`` → a validated, frozen ``Desired``, or every problem with file:line:col.

One pass, in order: YAML (with marks, duplicate keys, tabs, truncation) → JSON Schema
(``schemas/infernet.schema.json``, errors reworded) → semantic rules the schema cannot express
(names per backend, duplicates after canonicalisation, advertised-name collisions, empty lists,
the VRAM reserve) → defaults. Any problem raises
``ValidationError`` listing all of them, so a user fixes the file in one go and an invalid file
never reaches the planner (contract §4.4).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler import units
from reconciler.config import gitcommit, schemacheck, yamldoc
from reconciler.config.rules import Check, build
from reconciler.errors import ConfigError, Problem, ValidationError
from reconciler.model import ConfigSource, Desired

ENV_CONFIG = "INFERNET_CONFIG"
SEARCH_PATH = (Path("infernet.yaml"), Path("/etc/infernet/infernet.yaml"))
SCHEMA_FILE = "infernet.schema.json"
MAX_ADVERTISED = 50
"""The control plane rejects a heartbeat listing more served_models. A file may list more (it
is valid, with or without a control plane); the plan warns and the first 50 are advertised."""

_EMPTY = "file is empty: expected at least 'served_models: [...]'"

# Wording for schema nodes by their "title": what a valid value looks like.
_EXPECTATIONS = {
    "size": units.SIZE_HINT,
    "vram budget": f"'auto' or {units.SIZE_HINT}",
    "duration": units.DURATION_HINT,
    "keep_alive": units.KEEP_ALIVE_HINT,
    "http URL": "an http:// or https:// URL",
    "source URL": "a URL starting with hf://, https://, http:// or file://",
    "sha256 checksum": "64 hex digits, optionally prefixed 'sha256:'",
    "model entry": "a model name or a mapping with at least 'name'",
    "model list": "a list of models, e.g. ['qwen2.5:14b']",
    "format version": "1 (the only version of this file format)",
}


def locate(explicit: str | None, *, env: Mapping[str, str] | None = None) -> Path:
    """The file to use: ``-c``, then ``$INFERNET_CONFIG``, then the search path."""
    env = os.environ if env is None else env
    if explicit:
        return _existing(Path(explicit), "given with -c/--config")
    if env.get(ENV_CONFIG):
        return _existing(Path(env[ENV_CONFIG]), f"from ${ENV_CONFIG}")
    for candidate in SEARCH_PATH:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p) for p in SEARCH_PATH)
    raise ConfigError(
        f"no infernet.yaml found (looked in: {looked}); pass -c FILE or set {ENV_CONFIG}"
    )


def load(path: Path, *, env: Mapping[str, str] | None = None) -> Desired:
    """Read and validate ``path``; raises ``ConfigError``/``ValidationError``, never a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValidationError(
            [Problem(str(path), line, column, "the file is not UTF-8 text; save it as UTF-8")]
        ) from exc
    desired = _validate_bounded(text, file=str(path), env=os.environ if env is None else env)
    source = ConfigSource(
        str(path), hashlib.sha256(data).hexdigest(), gitcommit.commit_of(path, data)
    )
    return replace(desired, source=source)


def parse(text: str, *, path: str, env: Mapping[str, str] | None = None) -> Desired:
    """Validate ``text`` as if read from ``path`` (no git lookup); raises ``ValidationError``."""
    desired = _validate_bounded(text, file=path, env=os.environ if env is None else env)
    return replace(desired, source=ConfigSource(path, hashlib.sha256(text.encode()).hexdigest()))


def schema_text() -> str:
    """The JSON Schema of ``infernet.yaml`` (``infernet schema`` prints it): the shipped file
    with the backend registry's kinds and settings sections, which is the shipped file itself
    while only the built-in backends are registered."""
    return schemacheck.shipped_or_assembled(SCHEMA_FILE)


def schema() -> dict[str, Any]:
    """The JSON Schema of ``infernet.yaml`` as a fresh dict."""
    value: dict[str, Any] = json.loads(schema_text())
    return value


# --------------------------------------------------------------------------- internals


def _existing(path: Path, origin: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{path} ({origin}) does not exist; check the path")
    return path


def _validate_bounded(text: str, *, file: str, env: Mapping[str, str]) -> Desired:
    """``_validate``; should some input still recurse past Python's limit (the YAML reader
    bounds nesting, so none is known to), it is one more invalid file, not a crash."""
    try:
        return _validate(text, file=file, env=env)
    except RecursionError:
        message = "the file is nested too deeply to check; infernet.yaml needs only a few levels"
        raise ValidationError([Problem(file, 1, 1, message)]) from None


def _validate(text: str, *, file: str, env: Mapping[str, str]) -> Desired:
    doc = yamldoc.read(text)
    check = Check(doc, file)
    for finding in doc.findings:
        check.problems.append(
            Problem(file, finding.mark.line, finding.mark.column, finding.message)
        )
    if doc.value is None and not check.problems:
        check.problems.append(Problem(file, 1, 1, _EMPTY))
    elif doc.value is not None and not isinstance(doc.value, dict):
        mark = doc.locate(())
        got = schemacheck.describe(doc.value)
        message = f"the top level must be a mapping like 'served_models: [...]', got {got}"
        check.problems.append(Problem(file, mark.line, mark.column, message))
    if check.problems and not isinstance(doc.value, dict):
        raise ValidationError(check.problems)

    raw: dict[str, Any] = doc.value
    # A value the YAML layer already complained about (bad tag, alias loop) is None here;
    # its schema error at the same spot would only repeat the first complaint.
    seen = {(f.mark.line, f.mark.column) for f in doc.findings}
    for error in schemacheck.check(raw, schema_text(), expectations=_EXPECTATIONS):
        mark = doc.locate(error.path, key=error.at_key)
        if (mark.line, mark.column) in seen:
            check.bad.add(error.path)
            continue
        check.report(error.path, error.message, at_key=error.at_key)
    desired = build(raw, check, env)
    if check.problems:
        check.problems.sort(key=lambda p: (p.line, p.column))
        raise ValidationError(check.problems)
    return desired
