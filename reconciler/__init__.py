"""infernet: keeps a GPU inference node's model inventory exactly as declared.

The package is a library first; ``reconciler.cli`` is a thin shell over it. The flow is
``config.desired.load`` → ``converge.observe`` → ``planning.plan`` (pure) →
``converge.executor`` (the only code that changes anything) → a heartbeat; ``converge.apply``
runs it start to end. CONTRIBUTING.md shows how the packages are laid out.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
