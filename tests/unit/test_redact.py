"""``redact``: URLs shown without credentials or query string."""

from __future__ import annotations

import pytest

from reconciler.config import desired
from reconciler.errors import ValidationError
from reconciler.redact import redact

CASES = [
    ("https://host/x.gguf", "https://host/x.gguf"),
    ("https://alice:pw@host:8443/x.gguf", "https://***@host:8443/x.gguf"),
    ("https://token@host/x.gguf", "https://***@host/x.gguf"),
    ("https://host/x.gguf?X-Amz-Signature=abc&X-Amz-Credential=k", "https://host/x.gguf?***"),
    ("https://u:p@h/x.gguf?sig=s#frag", "https://***@h/x.gguf?***#***"),
    ("hf://org/repo@v1/x.gguf", "hf://org/repo@v1/x.gguf"),
    ("file:///srv/models/x.gguf", "file:///srv/models/x.gguf"),
    (
        "source https://u:p@h/x.gguf?sig=s: 404 Not Found; check the URL",
        "source https://***@h/x.gguf?***: 404 Not Found; check the URL",
    ),
    ("can't reach it (https://u:p@h/x.gguf)", "can't reach it (https://***@h/x.gguf)"),
    ("got 'ftp://u:p@h/x?y=1'", "got 'ftp://***@h/x?***'"),
    ("no URL here: user:pass@host", "no URL here: user:pass@host"),
]


@pytest.mark.parametrize(("text", "shown"), CASES)
def test_urls_lose_credentials_and_query(text: str, shown: str) -> None:
    assert redact(text).startswith(shown)
    for secret in ("pw", "abc", ":p@", "sig=s", "y=1"):
        if secret in text and "URL" not in text:
            assert secret not in redact(text)


def test_a_validation_message_never_repeats_a_source_secret() -> None:
    """The file's own errors go to status and to the heartbeat's errors."""
    text = (
        "served_models:\n"
        "  - {name: x.gguf, backend: llamacpp, source: 'ftp://u:S3CRET@h/x.gguf?sig=S1G'}\n"
    )
    with pytest.raises(ValidationError) as caught:
        desired.parse(text, path="f", env={})
    message = str(caught.value)
    assert "ftp://***@h/x.gguf?***" in message
    assert "S3CRET" not in message and "S1G" not in message
