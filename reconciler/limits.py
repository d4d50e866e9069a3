"""Every limit infernet keeps, in one place: what a peer may send us and what we send it.

The control plane's own limits come first: it keeps at most ``MAX_ADVERTISED`` names per node
and drops a name outside 1-``MAX_MODEL_NAME`` characters, so the plan advertises the first 50
in file order and remote commands refuse longer names.
"""

from __future__ import annotations

MAX_ADVERTISED = 50
"""The control plane rejects a heartbeat listing more served_models. A file may list more (it
is valid, with or without a control plane); the plan warns and the first 50 are advertised."""
MAX_MODEL_NAME = 200
"""The control plane's limit for a served_models string (and so for any model name we take)."""
