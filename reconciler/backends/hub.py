"""The Hugging Face Hub as ``huggingface_hub`` sees it: endpoint, auth headers, and one line for
each way it says no. Shared by ``hf://`` GGUF sources and the vLLM/SGLang/MAX backend."""

from __future__ import annotations

import os

from reconciler.errors import BackendError, ModelNotFound, TransientBackendError
from reconciler.redact import redact


def endpoint() -> str:
    """``HF_ENDPOINT`` now (``huggingface_hub`` reads it once at import; it may change)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def headers() -> dict[str, str]:
    """The hub's request headers, ``HF_TOKEN`` included when set."""
    from huggingface_hub.utils._headers import build_hf_headers

    return dict(build_hf_headers())


def error(
    what: str, repo: str, revision: str | None, path: str | None, exc: Exception
) -> BackendError:
    """``exc`` from ``huggingface_hub`` as one line that says what to do; ``what`` starts it."""
    from huggingface_hub import errors as hf

    where = f"{repo}@{revision or 'main'}"
    if isinstance(exc, hf.GatedRepoError):
        return BackendError(
            f"{what}: {repo} is gated; accept its terms on the hub and set HF_TOKEN to a token "
            "of that account"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelNotFound(
            f"{what}: repository {repo} not found on {redact(endpoint())} (or it is private: "
            "set HF_TOKEN)"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelNotFound(f"{what}: revision not found in {where}")
    if isinstance(exc, hf.EntryNotFoundError):
        return ModelNotFound(f"{what}: no file {path} in {where}")
    if isinstance(exc, hf.OfflineModeIsEnabled | hf.LocalEntryNotFoundError):
        return BackendError(f"{what}: the hub is not reachable ({redact(str(exc))})")
    if not isinstance(exc, hf.HfHubHTTPError):  # a transport error: refused, reset, timeout
        return TransientBackendError(
            f"{what}: can't reach the hub at {redact(endpoint())} ({redact(str(exc))})"
        )
    # The status only: the hub's error text is an upstream body, and this message goes to
    # the heartbeat and to a dashboard that sent a command.
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return TransientBackendError(
        f"{what}: the hub at {redact(endpoint())} answered HTTP {status or 'with an error'}"
    )


def http_errors() -> tuple[type[Exception], ...]:
    """The exception types ``error`` understands (for ``except`` clauses): the hub's own, and
    the transport errors of the HTTP client ``huggingface_hub`` uses (``httpx2`` since 2.0,
    a fork of httpx whose classes are not httpx's)."""
    from huggingface_hub import errors as hf

    types: list[type[Exception]] = [
        hf.HfHubHTTPError,
        hf.OfflineModeIsEnabled,
        hf.LocalEntryNotFoundError,
    ]
    try:
        import httpx2  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return tuple(types)
    types.append(httpx2.HTTPError)
    return tuple(types)
