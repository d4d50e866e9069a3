"""The node's identity: a BIP-340 key on disk, and the signed envelope that proves it.

The Infernet control plane has no node tokens: the x-only public key *is* the node, and every
call carries ``X-Infernet-Auth``, a base64url (unpadded) compact JSON envelope
``{"v":1,"pubkey","created_at","nonce","sig"}``. ``sig`` is a BIP-340 Schnorr signature over
SHA-256 of ``METHOD\\npath\\ncreated_at\\nnonce\\nsha256hex(body)``, where ``path`` is the path and
query as sent (no host) and the body hash is over the exact bytes on the wire
(``packages/auth/src/signed-request.js`` in Infernet Protocol).

The key file holds the 32-byte secret as 64 lowercase hex characters and a newline, mode 0600:
the same hex form as ``node.privateKey`` in the Infernet CLI's config, so a key can move
between the two by copy and paste.

``coincurve`` is imported inside the functions that need it, so commands that never touch
the control plane don't pay for loading libsecp256k1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import ConfigError

if TYPE_CHECKING:
    from coincurve import PrivateKey

AUTH_HEADER = "X-Infernet-Auth"
ENVELOPE_VERSION = 1
NONCE_BYTES = 16
_HEX = frozenset("0123456789abcdefABCDEF")


class KeyFileError(ConfigError):
    """The node key file is missing, unsafe, unreadable or not a BIP-340 secret key."""


@dataclass(frozen=True)
class NodeKey:
    """A loaded node key: the secret stays inside; ``pubkey`` is the 64-hex x-only key."""

    pubkey: str
    path: Path | None
    _key: PrivateKey = field(repr=False, compare=False)

    def sign(self, message_hash: bytes) -> str:
        """BIP-340 signature (128 hex) over a 32-byte hash, with fresh auxiliary randomness.

        Fresh aux randomness is what BIP-340 recommends against side-channel and fault
        attacks; the signature stays valid either way, so verifiers can't tell.
        """
        if len(message_hash) != 32:
            raise ValueError(f"BIP-340 signs a 32-byte hash, got {len(message_hash)} bytes")
        return self._key.sign_schnorr(message_hash, os.urandom(32)).hex()


def key_from_secret(secret_hex: str, path: Path | None = None) -> NodeKey:
    """A ``NodeKey`` from 64 hex characters; ``ValueError`` when they are not a valid secret."""
    from coincurve import PrivateKey

    text = secret_hex.strip()
    if len(text) != 64 or not set(text) <= _HEX:
        raise ValueError("expected 64 hex characters")
    try:
        key = PrivateKey(bytes.fromhex(text))
    except ValueError as exc:  # zero or not below the curve order
        raise ValueError("not a valid secp256k1 secret key") from exc
    return NodeKey(key.public_key_xonly.format().hex(), path, key)


def generate_key(path: Path, *, force: bool = False) -> str:
    """Write a new secret key to ``path`` (mode 0600) and return its x-only public key hex.

    The parent directory is created with mode 0700 when missing. An existing key is kept
    unless ``force``: replacing it changes the node's identity on the control plane.
    """
    from coincurve import PrivateKey

    path = Path(path).expanduser()
    if path.exists() and not force:
        raise KeyFileError(
            f"key file {path} already exists; keep it, or pass --force to replace it "
            "(the node then registers as a new identity)"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {path.parent} for the key file: {_why(exc)}") from exc
    key = PrivateKey(secrets.token_bytes(32))
    _write_secret(path, key.secret.hex() + "\n", replace=force)
    return key.public_key_xonly.format().hex()


def load_key(path: Path | str) -> NodeKey:
    """Read the key file, refusing one that group or others can read or write."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} not found; create one with `infernet keygen --out {path}`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {_why(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file; point key_file at the key")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        how = "readable" if mode & 0o044 else "writable"
        raise KeyFileError(
            f"key file {path} is {how} by others (mode {mode:04o}); run chmod 600 {path}"
        )
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {_why(exc)}") from exc
    try:
        return key_from_secret(text, path)
    except ValueError as exc:
        raise KeyFileError(
            f"key file {path} is malformed ({exc}: a hex BIP-340 secret key); "
            f"restore it, or make a new identity with `infernet keygen --out {path} --force`"
        ) from None


def hash_request(method: str, path: str, created_at: int, nonce: str, body: bytes) -> bytes:
    """SHA-256 of the canonical text the control plane recomputes from the request."""
    canonical = "\n".join(
        [method.upper(), path, str(created_at), nonce, hashlib.sha256(body).hexdigest()]
    )
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def sign_request(
    key: NodeKey,
    method: str,
    path: str,
    body: bytes,
    *,
    created_at: int | None = None,
    nonce: str | None = None,
) -> str:
    """The ``X-Infernet-Auth`` header value for one request; ``body`` is the bytes sent.

    ``created_at`` and ``nonce`` are for tests; production uses the clock and a fresh
    16-byte nonce, because the control plane rejects any nonce it has seen.
    """
    when = int(time.time()) if created_at is None else created_at
    once = secrets.token_hex(NONCE_BYTES) if nonce is None else nonce
    envelope = {
        "v": ENVELOPE_VERSION,
        "pubkey": key.pubkey,
        "created_at": when,
        "nonce": once,
        "sig": key.sign(hash_request(method, path, when, once, body)),
    }
    raw = json.dumps(envelope, separators=(",", ":")).encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _write_secret(path: Path, text: str, *, replace: bool) -> None:
    """Write via a 0600 temp file beside ``path``: the secret never exists with a wider mode.

    Without ``replace`` the temp file is hard-linked into place, which fails if another
    process created ``path`` meanwhile, instead of silently overwriting its key.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            os.fchmod(out.fileno(), 0o600)  # the umask could only narrow it; make it exact
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    except FileExistsError:
        raise KeyFileError(
            f"key file {path} already exists; keep it, or pass --force to replace it"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {_why(exc)}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _why(exc: BaseException) -> str:
    """An OS error's reason without the repeated file name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
