"""infernet: keeps a GPU inference node's model inventory exactly as declared.

The package is a library first; ``reconciler.cli`` is a thin shell over it. The flow is
``desired.load`` → ``observe.observe`` → ``plan.plan`` (pure) → ``apply.apply`` (the only code
that changes anything).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
