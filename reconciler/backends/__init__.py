"""The backend registry: the one place that maps a backend kind to its driver.

Every kind the file may name, every settings section under ``backends:``, the schema's
``backend`` list, the name rules, the models folders, the GPU process names, the CLI's
``--backend`` choices and the adapters come from here; an unknown kind is an error, never a
fall-through to some other backend's behaviour.

The built-in families register themselves (``ollama``, ``llamacpp``, ``hf`` for vllm, sglang
and max): each family package's ``__init__`` holds its ``FAMILY``, pure (its settings, name
rules and hooks); its adapters are named there and opened by the converge layer only. More
come from ``$INFERNET_BACKENDS``: a comma-separated list of ``package.module:attribute``, each a
``Family`` (or a sequence of them), imported on first use of the registry. See
CONTRIBUTING.md, "Add a backend".
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterable

from reconciler.backends.driver import Driver, Family, Settings
from reconciler.errors import ConfigError
from reconciler.model import BackendKind, Desired

PLUGINS_ENV = "INFERNET_BACKENDS"
_BUILTIN = ("reconciler.backends.ollama", "reconciler.backends.llamacpp", "reconciler.backends.hf")

_lock = threading.Lock()
_families: dict[str, Family] = {}
_drivers: dict[BackendKind, Driver] = {}
_family_of: dict[BackendKind, Family] = {}
_loaded = False


class UnknownBackend(ConfigError):
    """A kind no registered driver serves."""


def register(family: Family) -> None:
    """Add ``family`` and its kinds after the built-in ones; a name or kind already taken is a
    ``ConfigError``."""
    _ensure_loaded()
    with _lock:
        _add(family)


def driver(kind: str) -> Driver:
    """The driver of ``kind``; ``UnknownBackend`` names the known kinds when there is none."""
    _ensure_loaded()
    found = _drivers.get(BackendKind(kind))
    if found is None:
        known = ", ".join(k.value for k in _drivers)
        raise UnknownBackend(f"unknown backend '{kind}' (known: {known})")
    return found


def family_of(kind: str) -> Family:
    """The family ``kind`` belongs to (its settings section, its adapters)."""
    driver(kind)
    return _family_of[BackendKind(kind)]


def known(kind: str) -> bool:
    """Whether some registered driver serves ``kind``."""
    _ensure_loaded()
    return BackendKind(kind) in _drivers


def kinds() -> tuple[BackendKind, ...]:
    """Every registered kind, built-in ones first, in registration order."""
    _ensure_loaded()
    return tuple(_drivers)


def drivers() -> tuple[Driver, ...]:
    """Every registered driver, in registration order."""
    _ensure_loaded()
    return tuple(_drivers.values())


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    _ensure_loaded()
    return tuple(_families.values())


def settings_of(desired: Desired, kind: str) -> Settings:
    """The settings of ``kind``'s family in ``desired`` (its defaults when ``desired`` has none:
    a ``Desired`` made in code rather than read from a file)."""
    family = family_of(kind)
    found = desired.backend_settings.get(family.name)
    return found if found is not None else family.parse({}, {})


def _add(family: Family) -> None:
    if family.name in _families:
        raise ConfigError(f"backend family '{family.name}' is registered twice")
    taken = [d.kind.value for d in family.drivers if d.kind in _drivers]
    if taken:
        raise ConfigError(f"backend {', '.join(taken)} is registered twice")
    _families[family.name] = family
    for one in family.drivers:
        _drivers[one.kind] = one
        _family_of[one.kind] = family


def _ensure_loaded() -> None:
    global _loaded  # noqa: PLW0603 - the registry is process-wide by design
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for name in _BUILTIN:
            module = importlib.import_module(name)
            _add(module.FAMILY)
        for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
            for family in _plugin(spec):
                _add(family)
        _loaded = True


def _plugin(spec: str) -> Iterable[Family]:
    """The families named by one ``package.module:attribute`` of ``$INFERNET_BACKENDS``."""
    module_name, _, attribute = spec.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute or "FAMILY")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{PLUGINS_ENV}: can't load '{spec}' ({type(exc).__name__}: {exc}); each entry is "
            "package.module:attribute naming a backend Family"
        ) from exc
    found = [value] if isinstance(value, Family) else list(value)
    if not all(isinstance(f, Family) for f in found):
        raise ConfigError(f"{PLUGINS_ENV}: '{spec}' is not a backend Family or a list of them")
    return found


__all__ = [
    "PLUGINS_ENV",
    "Driver",
    "Family",
    "UnknownBackend",
    "driver",
    "drivers",
    "families",
    "family_of",
    "kinds",
    "known",
    "register",
    "settings_of",
]
