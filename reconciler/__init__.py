"""infernet: keeps a GPU inference node's model inventory exactly as declared.

The package is a library first; ``reconciler.cli`` is a thin shell over it. The flow is
``config.desired.load`` → ``converge.observe`` → ``planning.plan`` (pure) →
``converge.executor`` (the only code that changes anything) → a heartbeat; ``converge.apply``
runs it start to end. CONTRIBUTING.md shows how the packages are laid out.
"""

from __future__ import annotations

import sys

# httpx imports its own command line (click, rich, pygments: ~40 ms, near half of its import)
# whenever click is installed, which huggingface_hub brings. infernet never runs httpx's command
# line, and httpx falls back to a stub ``main`` when ``httpx._main`` cannot be imported.
if "httpx" not in sys.modules:
    # None in sys.modules is the documented "not importable" (typeshed types it as a module).
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

__version__ = "0.1.0"

__all__ = ["__version__"]
