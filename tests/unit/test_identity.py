"""The node key file and the signed-request envelope (reconciler.controlplane.identity)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from coincurve import PublicKeyXOnly

from reconciler.controlplane.identity import (
    KeyFileError,
    generate_key,
    hash_request,
    key_from_secret,
    load_key,
    sign_request,
)
from reconciler.errors import ConfigError, InfernetError

HEX64 = re.compile(r"^[0-9a-f]{64}$")
# BIP-340 test vector 1 (bips/bip-0340/test-vectors.csv).
BIP340_SECRET = "B7E151628AED2A6ABF7158809CF4F3C762E7160F38B4DA56A784D9045190CFEF"
BIP340_PUBKEY = "DFF1D77F2A671C5F36183726DB2341BE58FEAE1DA2DECED843240F7B502BA659"
BIP340_MESSAGE = "243F6A8885A308D313198A2E03707344A4093822299F31D0082EFA98EC4E6C89"
BIP340_SIG = (
    "6896BD60EEAE296DB48A229FF71DFE071BDE413E6D43F917DC8DCF8C78DE3341"
    "8906D11AC976ABCCB20B091292BFF4EA897EFCB639EA871CFA95F6DE339E4B0A"
)
CURVE_ORDER = "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141"


def decode_header(header: str) -> dict[str, object]:
    assert "=" not in header and re.fullmatch(r"[A-Za-z0-9_-]+", header)
    raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    envelope: dict[str, object] = json.loads(raw)
    # Compact JSON, keys in the order the real client writes them.
    assert raw == json.dumps(envelope, separators=(",", ":")).encode()
    assert list(envelope) == ["v", "pubkey", "created_at", "nonce", "sig"]
    return envelope


def verify(pubkey: str, sig: str, digest: bytes) -> bool:
    return bool(PublicKeyXOnly(bytes.fromhex(pubkey)).verify(bytes.fromhex(sig), digest))


# key files -------------------------------------------------------------------------------------


def test_generate_key_writes_0600_hex_secret_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "node.key"
    pubkey = generate_key(path)
    assert HEX64.match(pubkey)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n") and HEX64.match(text[:64])
    assert load_key(path).pubkey == pubkey
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left


def test_generate_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_key(tmp_path / "a.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600


def test_generate_key_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = generate_key(path)
    with pytest.raises(KeyFileError, match=r"already exists.*--force"):
        generate_key(path)
    assert load_key(path).pubkey == first
    second = generate_key(path, force=True)
    assert second != first and load_key(path).pubkey == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_key_refuses_a_key_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    generate_key(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    assert str(caught.value) == (
        f"key file {path} is readable by others (mode {mode:04o}); run chmod 600 {path}"
    )


def test_load_key_refuses_a_key_others_can_write(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    generate_key(path)
    path.chmod(0o620)
    with pytest.raises(KeyFileError, match=r"writable by others \(mode 0620\); run chmod 600"):
        load_key(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not a key\n",
        "ab" * 31 + "\n",  # 62 hex characters
        "ab" * 33 + "\n",
        "zz" * 32 + "\n",
        "00" * 32 + "\n",  # zero is no secret key
        CURVE_ORDER + "\n",  # nor is the group order
        "nsec1" + "q" * 59 + "\n",
    ],
)
def test_load_key_reports_a_malformed_file_in_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"key file {path} is malformed")
    assert "infernet keygen" in message


def test_load_key_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match=r"not found; create one with `infernet keygen --out"):
        load_key(path)


def test_load_key_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_key_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    generate_key(path)
    path.chmod(0o000)
    try:
        with pytest.raises(KeyFileError, match=r"cannot read key file .*permission denied"):
            load_key(path)
    finally:
        path.chmod(0o600)


def test_key_errors_are_config_errors_of_the_one_tree() -> None:
    assert issubclass(KeyFileError, ConfigError) and issubclass(KeyFileError, InfernetError)


def test_load_key_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    pubkey = generate_key(Path("~/.config/infernet/node.key"))
    assert load_key("~/.config/infernet/node.key").pubkey == pubkey
    assert (tmp_path / ".config" / "infernet" / "node.key").is_file()


# signatures ------------------------------------------------------------------------------------


def test_bip340_test_vector() -> None:
    key = key_from_secret(BIP340_SECRET)
    assert key.pubkey == BIP340_PUBKEY.lower()
    assert verify(key.pubkey, BIP340_SIG, bytes.fromhex(BIP340_MESSAGE))


def test_sign_round_trip_with_fresh_aux_randomness(tmp_path: Path) -> None:
    generate_key(tmp_path / "node.key")
    key = load_key(tmp_path / "node.key")
    digest = hashlib.sha256(b"hello").digest()
    first, second = key.sign(digest), key.sign(digest)
    assert re.fullmatch(r"[0-9a-f]{128}", first)
    assert first != second  # aux randomness differs, both are valid
    assert verify(key.pubkey, first, digest) and verify(key.pubkey, second, digest)
    assert not verify(key.pubkey, first, hashlib.sha256(b"hellp").digest())


def test_sign_takes_only_a_32_byte_hash() -> None:
    key = key_from_secret(BIP340_SECRET)
    with pytest.raises(ValueError, match="32-byte"):
        key.sign(b"short")


def test_the_secret_stays_out_of_repr() -> None:
    key = key_from_secret(BIP340_SECRET)
    assert BIP340_SECRET.lower() not in repr(key) and BIP340_SECRET not in repr(key)


def test_hash_request_is_the_protocol_text() -> None:
    body = b'{"role":"provider"}'
    text = (
        "POST\n/api/v1/node/heartbeat?x=1\n1700000000\n"
        + "ab" * 16
        + "\n"
        + hashlib.sha256(body).hexdigest()
    )
    assert hash_request("post", "/api/v1/node/heartbeat?x=1", 1700000000, "ab" * 16, body) == (
        hashlib.sha256(text.encode()).digest()
    )


def test_sign_request_envelope_verifies_over_the_exact_bytes() -> None:
    key = key_from_secret(BIP340_SECRET)
    body = '{"role":"provider","name":"ñ"}'.encode()
    envelope = decode_header(sign_request(key, "POST", "/api/v1/node/heartbeat", body))
    assert envelope["v"] == 1 and envelope["pubkey"] == key.pubkey
    assert isinstance(envelope["created_at"], int)
    nonce, sig = str(envelope["nonce"]), str(envelope["sig"])
    assert re.fullmatch(r"[0-9a-f]{32}", nonce) and re.fullmatch(r"[0-9a-f]{128}", sig)
    text = "\n".join(
        [
            "POST",
            "/api/v1/node/heartbeat",
            str(envelope["created_at"]),
            nonce,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    assert verify(key.pubkey, sig, hashlib.sha256(text.encode()).digest())


def test_every_request_gets_a_fresh_nonce() -> None:
    key = key_from_secret(BIP340_SECRET)
    nonces = {decode_header(sign_request(key, "POST", "/p", b"{}"))["nonce"] for _ in range(50)}
    assert len(nonces) == 50
