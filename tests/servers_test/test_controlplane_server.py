"""The real ControlPlane client against the control-plane stand-in, over loopback.

The server runs as a subprocess and checks signatures on its own (coincurve, the protocol's
canonical text), so a wrong byte anywhere in the client's signing shows up as a 401 here.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from coincurve import PublicKeyXOnly

from reconciler.controlplane.client import (
    ControlPlane,
    ControlPlaneError,
    offline_body,
    specs_for,
)
from reconciler.controlplane.identity import (
    NodeKey,
    generate_key,
    hash_request,
    key_from_secret,
    load_key,
    sign_request,
)
from reconciler.errors import ConfigError
from reconciler.model import ControlPlaneSettings, GpuInfo, GpuState
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane

NODE_ID = "gpu-node-17"
HEARTBEAT = "/api/v1/node/heartbeat"
REGISTER = "/api/v1/node/register"
CLOCK_MESSAGE = (
    "control plane refused the signature (401): check the node's clock (±60 s skew allowed) and key"
)
GPU = GpuState(
    "nvml",
    24564 << 20,
    20 << 30,
    (GpuInfo(0, "NVIDIA GeForce RTX 4090", 24564 << 20, 20 << 30, 0),),
)
EXTENSION = {"config_sha256": "ab" * 32, "converged": True, "drift": [], "errors": []}


# fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneServer]:
    with start_control_plane(tmp_path_factory.mktemp("controlplane")) as srv:
        yield srv


@pytest.fixture
def cp(server: ControlPlaneServer) -> ControlPlaneServer:
    server.reset()
    return server


def make_key(directory: Path, name: str = "node.key") -> NodeKey:
    generate_key(directory / name)
    return load_key(directory / name)


@pytest.fixture
def key(tmp_path: Path) -> NodeKey:
    return make_key(tmp_path)


def connect(url: str, key: NodeKey, **kwargs: Any) -> ControlPlane:
    settings = ControlPlaneSettings(url=url, node_id=kwargs.pop("node_id", NODE_ID))
    return ControlPlane(settings, key, timeout=kwargs.pop("timeout", 5.0), **kwargs)


@pytest.fixture
def client(cp: ControlPlaneServer, key: NodeKey) -> Iterator[ControlPlane]:
    with connect(cp.url, key) as c:
        yield c


def beat(models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    specs = specs_for(models or ["qwen2.5:7b"], GPU, extension=EXTENSION)
    return {"status": "available", "specs": specs, **extra}


def one_line_retryable(exc: ControlPlaneError, *needles: str) -> None:
    message = str(exc)
    assert exc.retryable, message
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message


def envelope(header: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    return result


def pack(env: dict[str, Any]) -> str:
    raw = json.dumps(env, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_post(
    url: str, path: str, body: bytes, header: str | None
) -> tuple[int, dict[str, Any] | None]:
    headers = {"content-type": "application/json"}
    if header is not None:
        headers["X-Infernet-Auth"] = header
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        resp = http.post(url + path, content=body, headers=headers)
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# register and heartbeat ------------------------------------------------------------------------


def test_heartbeat_404_registers_then_beats_again(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    body = beat(address="203.0.113.7", port=46337)
    outcome = client.heartbeat(body)
    assert outcome.registered and outcome.row_id
    seen = [(r["path"], r["status"]) for r in cp.received()]
    assert seen == [(HEARTBEAT, 404), (REGISTER, 200), (HEARTBEAT, 200)]
    first = cp.received()[0]
    assert first["error"] == "no row for this pubkey — call /register first"
    register = cp.received()[1]["body"]
    assert register["role"] == "provider" and register["node_id"] == NODE_ID
    assert register["name"] == NODE_ID
    assert (register["address"], register["port"]) == ("203.0.113.7", 46337)
    assert register["specs"] == body["specs"]
    assert register["gpu_model"] == "NVIDIA GeForce RTX 4090"
    assert all(r["pubkey"] == client.key.pubkey for r in cp.received())

    again = client.heartbeat(body)
    assert again.row_id == outcome.row_id and not again.registered
    assert len(cp.received()) == 4
    assert cp.heartbeats() == [{"role": "provider", **body}] * 2


def test_node_id_defaults_to_the_host_name(cp: ControlPlaneServer, key: NodeKey) -> None:
    settings = ControlPlaneSettings(url=cp.url)
    with ControlPlane(settings, key) as c:
        c.heartbeat(beat())
    assert cp.nodes()[0]["node_id"] == socket.gethostname()


def test_heartbeat_replaces_specs_wholesale(cp: ControlPlaneServer, client: ControlPlane) -> None:
    client.heartbeat(beat(["a:1", "b:2"]))
    later = beat(["b:2"])
    client.heartbeat(later)
    (node,) = cp.nodes()
    assert node["specs"] == later["specs"]  # not merged, not sanitized
    assert node["specs"]["reconciler"] == EXTENSION


def test_register_sanitizes_specs_like_the_real_one(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    specs = {
        "served_models": [f"m{i}" for i in range(60)] + ["", 7, "x" * 201],
        "gpus": [{"vendor": "NVIDIA", "vram_tier": "huge", "vram_mb": 30000, "model": "G" * 90}],
        "cpu": {"cores": 8},
        "reconciler": {"converged": True},
        "cli_version": "infernet 0.1.0",
    }
    assert client.register({"node_id": NODE_ID, "specs": specs}) == {
        "id": cp.nodes()[0]["id"],
        "node_id": NODE_ID,
    }
    stored = cp.nodes()[0]["specs"]
    assert stored["served_models"] == [f"m{i}" for i in range(50)]
    assert stored["gpus"] == [{"vendor": "nvidia", "vram_tier": "24-48gb", "model": "G" * 64}]
    assert "cpu" not in stored and "reconciler" not in stored
    assert stored["cli_version"] is None  # a space fails the server's version pattern


def test_register_without_a_valid_role_is_400(cp: ControlPlaneServer, key: NodeKey) -> None:
    body = json.dumps({"node_id": NODE_ID}).encode()
    status, reply = raw_post(cp.url, REGISTER, body, sign_request(key, "POST", REGISTER, body))
    assert status == 400
    assert reply == {"error": "role must be one of: provider, aggregator, client"}
    settings = ControlPlaneSettings(url=cp.url, role="miner", node_id=NODE_ID)
    with ControlPlane(settings, key) as c, pytest.raises(ControlPlaneError) as caught:
        c.register({"node_id": NODE_ID})
    assert caught.value.status == 400 and not caught.value.retryable


def test_node_id_bound_to_another_pubkey_is_403(
    cp: ControlPlaneServer, client: ControlPlane, tmp_path: Path
) -> None:
    client.heartbeat(beat())
    intruder_key = make_key(tmp_path, "other.key")
    with connect(cp.url, intruder_key) as intruder, pytest.raises(ControlPlaneError) as caught:
        intruder.heartbeat(beat())
    assert caught.value.status == 403
    assert "node_id is registered to a different pubkey" in str(caught.value)


def test_offline_heartbeat(cp: ControlPlaneServer, client: ControlPlane) -> None:
    assert client.heartbeat(offline_body("provider")).row_id is None  # nothing to mark yet
    assert [r["path"] for r in cp.received()] == [HEARTBEAT]
    client.heartbeat(beat())
    client.heartbeat(offline_body("provider"))
    assert cp.nodes()[0]["status"] == "offline"


def test_a_url_that_is_not_the_control_plane_does_not_register(
    cp: ControlPlaneServer, key: NodeKey
) -> None:
    with connect(cp.url + "/wrong/prefix", key) as c, pytest.raises(ControlPlaneError) as caught:
        c.heartbeat(beat())
    assert caught.value.status == 404 and not caught.value.retryable
    assert "no Infernet control plane at" in str(caught.value)
    assert [r["path"] for r in cp.received()] == ["/wrong/prefix" + HEARTBEAT]


def test_more_than_fifty_models_fail_before_anything_is_sent(cp: ControlPlaneServer) -> None:
    with pytest.raises(ValueError, match="at most 50"):
        beat([f"m{i}" for i in range(51)])
    assert cp.received() == []


# signatures ------------------------------------------------------------------------------------

BODY = b'{"role":"provider","node_id":"gpu-node-17","name":"gpu-node-17"}'
SIGNED_PATH = REGISTER + "?probe=1"


def flip_hex(text: str, at: int = -1) -> str:
    chars = list(text)
    chars[at] = "0" if chars[at] != "0" else "1"
    return "".join(chars)


def tamper_body(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return env, SIGNED_PATH, BODY.replace(b"-17", b"-18")


def tamper_path(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return env, SIGNED_PATH.replace("=1", "=2"), BODY


def tamper_nonce(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return {**env, "nonce": flip_hex(env["nonce"])}, SIGNED_PATH, BODY


def tamper_sig(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return {**env, "sig": flip_hex(env["sig"], 40)}, SIGNED_PATH, BODY


def tamper_created_at(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return {**env, "created_at": env["created_at"] - 1}, SIGNED_PATH, BODY


def tamper_pubkey(env: dict[str, Any]) -> tuple[dict[str, Any], str, bytes]:
    return {**env, "pubkey": flip_hex(env["pubkey"], 10)}, SIGNED_PATH, BODY


TAMPERS: list[Callable[[dict[str, Any]], tuple[dict[str, Any], str, bytes]]] = [
    tamper_body,
    tamper_path,
    tamper_nonce,
    tamper_sig,
    tamper_created_at,
    tamper_pubkey,
]


def test_an_untampered_request_is_accepted(cp: ControlPlaneServer, key: NodeKey) -> None:
    status, reply = raw_post(
        cp.url, SIGNED_PATH, BODY, sign_request(key, "POST", SIGNED_PATH, BODY)
    )
    assert status == 200 and reply is not None and reply["data"]["node_id"] == NODE_ID
    assert cp.received()[0]["pubkey"] == key.pubkey


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda f: f.__name__)
def test_one_changed_byte_is_refused(
    cp: ControlPlaneServer,
    key: NodeKey,
    tamper: Callable[[dict[str, Any]], tuple[dict[str, Any], str, bytes]],
) -> None:
    env, path, body = tamper(envelope(sign_request(key, "POST", SIGNED_PATH, BODY)))
    status, reply = raw_post(cp.url, path, body, pack(env))
    assert status == 401
    assert reply == {"error": "signature verification failed"}
    assert cp.nodes() == [] and cp.received()[0]["pubkey"] is None


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, "missing X-Infernet-Auth header"),
        ("!!!not-base64!!!", "invalid X-Infernet-Auth envelope"),
        (pack({"v": 2}), "unsupported envelope version: 2"),
    ],
)
def test_malformed_envelopes_are_401(
    cp: ControlPlaneServer, header: str | None, error: str
) -> None:
    status, reply = raw_post(cp.url, REGISTER, BODY, header)
    assert status == 401 and reply is not None and reply["error"].startswith(error)


def test_a_reused_nonce_is_401(cp: ControlPlaneServer, key: NodeKey) -> None:
    header = sign_request(key, "POST", REGISTER, BODY)
    assert raw_post(cp.url, REGISTER, BODY, header)[0] == 200
    assert raw_post(cp.url, REGISTER, BODY, header) == (401, {"error": "nonce already used"})


@pytest.mark.parametrize("offset", [61, -61])
def test_clock_skew_over_60_s_is_401_with_the_clock_message(
    cp: ControlPlaneServer, client: ControlPlane, offset: int
) -> None:
    cp.set_clock_offset(offset)
    with pytest.raises(ControlPlaneError) as caught:
        client.heartbeat(beat())
    assert str(caught.value).startswith(CLOCK_MESSAGE)
    assert "skew=61s" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.status == 401 and not caught.value.retryable


@pytest.mark.parametrize("offset", [55, -55])
def test_clock_skew_inside_the_window_is_accepted(
    cp: ControlPlaneServer, client: ControlPlane, offset: int
) -> None:
    cp.set_clock_offset(offset)
    assert client.heartbeat(beat()).registered


def test_the_signed_path_is_the_path_on_the_wire(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    # An id needing escapes: a signature over the unescaped path would be a 401, not a 404.
    with pytest.raises(ControlPlaneError) as caught:
        client.post_progress("a/b c?d", {"status": "x"})
    assert caught.value.status == 404 and caught.value.detail == "command not found"
    assert cp.received()[0]["path"] == "/api/v1/node/commands/a%2Fb%20c%3Fd/progress"


def test_the_body_sent_is_the_body_signed() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": {"id": "row-1"}})

    key = key_from_secret("11" * 32)
    settings = ControlPlaneSettings(url="https://cp.example/base/", node_id=NODE_ID)
    with ControlPlane(settings, key, transport=httpx.MockTransport(answer)) as c:
        c.heartbeat({"status": "available", "note": "ünïcode"})
    (request,) = seen
    assert request.url.raw_path == b"/base/api/v1/node/heartbeat"
    assert request.content == json.dumps(
        {"role": "provider", "status": "available", "note": "ünïcode"}, separators=(",", ":")
    ).encode("ascii")
    env = envelope(request.headers["X-Infernet-Auth"])
    digest = hash_request(
        "POST", "/base/api/v1/node/heartbeat", env["created_at"], env["nonce"], request.content
    )
    assert PublicKeyXOnly(bytes.fromhex(key.pubkey)).verify(bytes.fromhex(env["sig"]), digest)


# resilience ------------------------------------------------------------------------------------


def test_unreachable_control_plane_is_retryable(key: NodeKey) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with connect(url, key) as c, pytest.raises(ControlPlaneError) as caught:
        c.heartbeat(beat())
    one_line_retryable(caught.value, "cannot reach the control plane at", url)


def test_503_is_retryable_and_recovers(cp: ControlPlaneServer, client: ControlPlane) -> None:
    cp.set_down(30)
    with pytest.raises(ControlPlaneError) as caught:
        client.heartbeat(beat())
    one_line_retryable(caught.value, "HTTP 503", HEARTBEAT)
    assert caught.value.status == 503
    cp.set_down(None)
    assert client.heartbeat(beat()).registered


def test_an_html_answer_is_retryable(cp: ControlPlaneServer, client: ControlPlane) -> None:
    cp.set_down(30, mode="garbage")
    with pytest.raises(ControlPlaneError) as caught:
        client.poll_commands()
    one_line_retryable(caught.value, "not JSON", "text/html")


def test_a_dropped_connection_is_retryable(cp: ControlPlaneServer, client: ControlPlane) -> None:
    cp.set_down(30, mode="close")
    with pytest.raises(ControlPlaneError) as caught:
        client.heartbeat(beat())
    one_line_retryable(caught.value, "cannot reach the control plane")


def test_a_timeout_is_retryable(cp: ControlPlaneServer, key: NodeKey) -> None:
    cp.set_down(3, mode="hang")
    with connect(cp.url, key, timeout=0.5) as c, pytest.raises(ControlPlaneError) as caught:
        c.heartbeat(beat())
    one_line_retryable(caught.value, "did not answer within 0.5 s")


def test_a_url_without_scheme_is_a_config_error(key: NodeKey) -> None:
    with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
        connect("infernet.example", key)


def test_a_missing_ca_bundle_is_a_config_error(key: NodeKey, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CA bundle .* is unusable"):
        connect("https://infernet.example", key, ca_bundle=str(tmp_path / "none.pem"))


def test_tls_is_verified_and_the_ca_bundle_is_configurable(tmp_path: Path, key: NodeKey) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme makes the test CA")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with start_control_plane(tmp_path / "tls", certfile=tmp_path / "server.pem") as tls:
        assert tls.url.startswith("https://")
        with connect(tls.url, key) as c, pytest.raises(ControlPlaneError) as caught:
            c.heartbeat(beat())
        message = str(caught.value)
        assert (
            "TLS certificate not trusted" in message and "CA bundle option (ca_bundle)" in message
        )
        assert "\n" not in message and not caught.value.retryable
        with connect(tls.url, key, ca_bundle=str(tmp_path / "ca.pem")) as trusted:
            assert trusted.heartbeat(beat()).registered


# commands --------------------------------------------------------------------------------------


def test_poll_claims_pending_commands_once(cp: ControlPlaneServer, client: ControlPlane) -> None:
    first = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "qwen2.5:7b"})
    second = cp.enqueue_command(client.key.pubkey, "model_remove", {"model": "llama3.2:3b"})
    cp.enqueue_command("ff" * 32, "model_install", {"model": "not-mine"})
    commands = client.poll_commands()
    assert [(c.id, c.command, c.args) for c in commands] == [
        (first, "model_install", {"model": "qwen2.5:7b"}),
        (second, "model_remove", {"model": "llama3.2:3b"}),
    ]
    assert cp.command(first)["status"] == "running" and cp.command(first)["started_at"]
    assert client.poll_commands() == []
    assert cp.received()[0]["body"] == {"limit": 5}


def test_poll_takes_at_most_ten(cp: ControlPlaneServer, client: ControlPlane) -> None:
    for i in range(12):
        cp.enqueue_command(client.key.pubkey, "model_install", {"model": f"m{i}"})
    assert len(client.poll_commands(limit=50)) == 10
    assert len(client.poll_commands(limit=1)) == 1


def test_progress_keeps_allowed_keys_and_echoes_cancel(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    command_id = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "m"})
    client.poll_commands()
    progress = {"status": "s" * 100, "phase": "download", "pct": 150, "total": 10, "junk": True}
    assert client.post_progress(command_id, progress) == "running"
    assert cp.command(command_id)["progress"] == {
        "status": "s" * 64,
        "phase": "download",
        "step": None,
        "steps": None,
        "total": 10,
        "completed": None,
        "pct": 100,
    }
    client.post_progress(command_id, {"pct": -5})
    assert cp.command(command_id)["progress"]["pct"] == 0
    assert cp.cancel(command_id)["cancelled"]
    assert client.post_progress(command_id, {"status": "pulling"}) == "cancelled"


def test_complete_takes_effect_exactly_once(cp: ControlPlaneServer, client: ControlPlane) -> None:
    command_id = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "m"})
    client.poll_commands()
    result = {"stdout": "pulled via /api/pull", "code": 0}
    assert client.complete(command_id, status="completed", result=result) == "completed"
    done = cp.command(command_id)
    assert done["status"] == "completed" and done["result"] == result
    assert client.complete(command_id, status="failed", error="late") == "completed"  # no-op
    after = cp.command(command_id)
    assert after["status"] == "completed" and after["error"] is None
    assert after["completed_at"] == done["completed_at"] and after["complete_calls"] == 2
    replies = [r for r in cp.received() if r["path"].endswith("/complete")]
    assert [r["status"] for r in replies] == [200, 200]


def test_failed_completion_stores_a_cleaned_error(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    command_id = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "m"})
    client.poll_commands()
    noisy = "\x1b[?25lpulling manifest ⠋\rpulling manifest ⠙\nError: pull model manifest: 404"
    assert client.complete(command_id, status="failed", error=noisy) == "failed"
    assert cp.command(command_id)["error"] == (
        "pulling manifest ⠙\nError: pull model manifest: 404"
    )


def test_completing_a_cancelled_command_leaves_the_cancel(
    cp: ControlPlaneServer, client: ControlPlane
) -> None:
    command_id = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "m"})
    client.poll_commands()
    cp.cancel(command_id)
    assert client.complete(command_id, status="completed") == "cancelled"
    assert cp.command(command_id)["status"] == "cancelled"


def test_complete_checks_status_id_and_owner(
    cp: ControlPlaneServer, client: ControlPlane, tmp_path: Path
) -> None:
    command_id = cp.enqueue_command(client.key.pubkey, "model_install", {"model": "m"})
    client.poll_commands()
    with pytest.raises(ValueError, match="'completed' or 'failed'"):
        client.complete(command_id, status="done")
    path = f"/api/v1/node/commands/{command_id}/complete"
    body = b'{"status":"done"}'
    assert raw_post(cp.url, path, body, sign_request(client.key, "POST", path, body)) == (
        400,
        {"error": "status must be completed | failed"},
    )
    with pytest.raises(ControlPlaneError) as unknown:
        client.complete("no-such-id", status="completed")
    assert unknown.value.status == 404
    other_key = make_key(tmp_path, "other.key")
    with connect(cp.url, other_key) as other, pytest.raises(ControlPlaneError) as foreign:
        other.complete(command_id, status="completed")
    assert foreign.value.status == 403
    assert "command does not target this pubkey" in str(foreign.value)
    assert cp.command(command_id)["status"] == "running"
