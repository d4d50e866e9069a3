"""A signing node client for the control-plane stand-in, written apart from the product's.

    node = SignedNode(cp.url)                 # a fresh BIP-340 key
    node.register("gpu-1", specs={...})       # raw httpx responses, whatever the status
    node.heartbeat({"served_models": ["m:1"], "load": {...}})
    node.poll_jobs(limit=5).json()["data"]["jobs"]
    node.post_events(job_id, [{"event_type": "token", "data": {"text": "hi"}}])
    node.complete(job_id, {"status": "completed", "result": {...}})

Signing follows ``shared/reference/infernet-jobs.md`` §1 (``packages/auth/src/signed-request.js``)
with ``coincurve``: the canonical text ``METHOD\\nPATH\\nCREATED_AT\\nNONCE\\nSHA256_HEX(BODY)``,
its SHA-256 signed with BIP-340 Schnorr, the envelope as unpadded base64url JSON in
``X-Infernet-Auth``, the body as ``JSON.stringify`` writes it. It lets the server's own tests
(and tests that need a second node, a peer) talk to the server without the product's client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from types import TracebackType
from typing import Any, Self

import httpx
from coincurve import PrivateKey, PublicKeyXOnly

HEADER = "X-Infernet-Auth"


def js_stringify(value: Any) -> bytes:
    """``JSON.stringify``: compact, non-ASCII kept as UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class SignedNode:
    """One node key and an HTTP client that signs every request with it."""

    def __init__(self, url: str, secret: bytes | None = None, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.secret = secret if secret is not None else os.urandom(32)
        self._key = PrivateKey(self.secret)
        self.pubkey = PublicKeyXOnly.from_secret(self.secret).format().hex()
        self._http = httpx.Client(timeout=timeout, trust_env=False, verify=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def auth_header(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        created_at: int | None = None,
        nonce: str | None = None,
    ) -> str:
        """The ``X-Infernet-Auth`` value for this exact request."""
        created = int(time.time()) if created_at is None else created_at
        nonce = os.urandom(16).hex() if nonce is None else nonce
        canonical = "\n".join(
            [method.upper(), path, str(created), nonce, hashlib.sha256(body).hexdigest()]
        )
        digest = hashlib.sha256(canonical.encode("utf-8")).digest()
        sig = self._key.sign_schnorr(digest, os.urandom(32)).hex()
        envelope = {"v": 1, "pubkey": self.pubkey, "created_at": created, "nonce": nonce}
        envelope["sig"] = sig
        return base64.urlsafe_b64encode(js_stringify(envelope)).decode("ascii").rstrip("=")

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None) -> httpx.Response:
        """A signed POST of ``body`` (JSON) or ``raw`` bytes to ``path``."""
        data = raw if raw is not None else (b"" if body is None else js_stringify(body))
        headers = {HEADER: self.auth_header("POST", path, data)}
        if data:
            headers["content-type"] = "application/json"
        return self._http.post(self.url + path, content=data, headers=headers)

    def register(self, node_id: str, **fields: Any) -> httpx.Response:
        return self.post("/api/v1/node/register", {"role": "provider", "node_id": node_id} | fields)

    def heartbeat(
        self, specs: dict[str, Any] | None = None, *, status: str = "available", **fields: Any
    ) -> httpx.Response:
        body: dict[str, Any] = {"role": "provider", "status": status} | fields
        if specs is not None:
            body["specs"] = specs
        return self.post("/api/v1/node/heartbeat", body)

    def poll_jobs(self, limit: Any = 5, **fields: Any) -> httpx.Response:
        return self.post("/api/v1/node/jobs/poll", {"limit": limit} | fields)

    def post_events(self, job_id: str, events: Any) -> httpx.Response:
        return self.post(f"/api/v1/node/jobs/{job_id}/events", {"events": events})

    def complete(self, job_id: str, body: dict[str, Any]) -> httpx.Response:
        return self.post(f"/api/v1/node/jobs/{job_id}/complete", body)
