"""The deterministic answer every chat stand-in gives (Ollama test server, fake engine).

The reply echoes the last user message so a test can tell jobs apart and predict the text:
``["You", " said:", " <word>", …, " That", " is", " all."]`` (at most 256 words echoed).
``length`` makes it exactly that many tokens, repeating the pattern: a long answer for
benchmarks. Concatenated, the tokens are the full text; a cap (``num_predict``,
``max_tokens``) keeps a prefix of them.
"""

from __future__ import annotations

from typing import Any

MAX_ECHOED_WORDS = 256
_TAIL = [" That", " is", " all."]


def last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def reply_tokens(messages: Any, length: int | None = None) -> list[str]:
    """The reply's tokens (deltas), before any cap."""
    words = last_user_text(messages).split()[:MAX_ECHOED_WORDS]
    tokens = ["You", " said:", *(f" {w}" for w in words), *_TAIL]
    if length is None or length <= 0:
        return tokens
    repeated = tokens + [f" {t.lstrip()}" for t in tokens] * (length // len(tokens) + 1)
    return repeated[:length]


def reply_text(messages: Any, cap: int | None = None, length: int | None = None) -> str:
    """The full answer, with at most ``cap`` tokens when ``cap`` > 0."""
    tokens = reply_tokens(messages, length)
    return "".join(tokens[:cap] if cap is not None and cap > 0 else tokens)


def prompt_tokens(messages: Any) -> int:
    """A stand-in prompt token count: words of every message plus 4 per message."""
    count = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        count += 4 + (len(content.split()) if isinstance(content, str) else 0)
    return count
