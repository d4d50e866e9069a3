"""Every limit infernet keeps, in one place: what a peer may send us and what we send it.

The control plane's own limits come first: it keeps at most ``MAX_ADVERTISED`` names per node
and drops a name outside 1-``MAX_MODEL_NAME`` characters, so the plan advertises the first 50
in file order and remote commands refuse longer names. Then what an answer may weigh
(``*_BODY``, enforced by ``httpsafe``), and how much of an error or a peer's text reaches a
line (``errors.one_line``).
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20

# --------------------------------------------------------------------------- the control plane

MAX_ADVERTISED = 50
"""The control plane rejects a heartbeat listing more served_models. A file may list more (it
is valid, with or without a control plane); the plan warns and the first 50 are advertised."""
MAX_MODEL_NAME = 200
"""The control plane's limit for a served_models string (and so for any model name we take)."""
POLL_LIMIT = 5
"""Commands claimed per poll (the server allows at most 10); more handed out are ignored."""
MAX_COMMAND_ID = 128
"""Real command ids are UUIDs; a longer one is not a command we can answer."""
MAX_VERB = 64
"""Characters of a command's verb kept (and quoted when it is refused)."""
PROGRESS_STATUS = 64
"""What the control plane keeps of a command progress's ``status``..."""
PROGRESS_PHASE = 32
"""...and of its ``phase``."""
MAX_JOB_ID = 128
"""Real job ids are UUIDs; a longer one is not a job we can answer."""
MAX_MESSAGES = 1000
"""Messages of one chat job taken; a longer conversation is refused."""
MAX_PROMPT_CHARS = 1 * (1 << 20)
"""Characters of one chat job's messages (the poll answer is capped at 1 MiB anyway)."""
JOB_ERROR = 1024
"""Characters of a failed job's error: the control plane keeps this much."""
GPU_MODEL_NAME = 64
"""Characters of a GPU's model name in the heartbeat's specs."""

# --------------------------------------------------------------------------- answer sizes

CONTROL_PLANE_BODY = 1 * MiB
"""The control plane's answers are a few hundred bytes; ten commands with arguments fit."""
REGISTRY_BODY = 4 * MiB
"""A registry manifest or config blob (Ollama's are under 2 KiB; the hub's config.json files
under 100 KiB)."""
BACKEND_BODY = 32 * MiB
"""A local backend's listing or model details (thousands of models, a long license text)."""
PROBE_BODY = 1 * MiB
"""An engine's ``/v1/models``."""
CHAT_BODY = 64 * MiB
"""A streamed chat answer: NDJSON or SSE, about 200-300 bytes a token, so some 250,000 tokens,
more than any context a node serves."""
PROGRESS_BYTES = 64 * KiB
"""What each stall window of a download must bring (218 bytes/s over the default 300 s)."""

# --------------------------------------------------------------------------- text on one line

ANSWER_TEXT = 500
"""Characters of an error in a command's answer: the server keeps 2000, a line is enough."""
PEER_TEXT = 200
"""Characters of a peer's own error text (a control plane, Ollama, the router) kept in ours."""
FAULT_TEXT = 300
"""Characters of an unexpected exception's text in the daemon's fault line."""
DETAIL_TEXT = 200
"""Characters of an exception's text in a one-line error about a file or the state store."""
SHOWN_NAME = 80
"""Characters of an untrusted name quoted back in a refusal."""
