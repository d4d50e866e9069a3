"""plan → apply → plan over loopback, through the real CLI: the reconcile end to end."""

from __future__ import annotations

import json
import signal
import time

from tests.integration.conftest import Node, needs_fake

SMALL = "smollm2:135m"
EMBED = "all-minilm:latest"
QWEN = "qwen2.5:0.5b"


def _plan(node: Node, *extra: str) -> dict:  # type: ignore[type-arg]
    out = node.run("plan", "--json", *extra)
    assert out.returncode in (0, 2), out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_plan_apply_plan_is_empty(node: Node) -> None:
    node.write_config([SMALL, EMBED])
    doc = _plan(node)
    assert [(a["op"], a["model"]) for a in doc["actions"]] == [("pull", SMALL), ("pull", EMBED)]
    assert all(a["download_bytes"] > 0 for a in doc["actions"])
    assert doc["budget"]["download_bytes"] == sum(a["download_bytes"] for a in doc["actions"])
    first = node.run("apply", "--yes", "--detailed-exitcode")
    assert first.returncode == 2, first.stderr
    assert {SMALL, EMBED} <= node.installed()
    again = node.run("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes" in again.stdout
    noop = node.run("apply", "--yes", "--detailed-exitcode")
    assert noop.returncode == 0, noop.stderr


def test_apply_json_lines_and_progress(node: Node) -> None:
    node.write_config([QWEN])
    out = node.run("apply", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "action_started"
    assert "progress" in kinds
    assert kinds[-2:] == ["converged", "result"]
    assert events[-1]["converged"] is True
    assert events[-1]["advertised"] == [QWEN]


def test_removal_unloads_before_delete_and_spares_hand_pulled(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL, {"name": QWEN, "keep_alive": "forever"}])
    assert node.run("apply", "--yes").returncode == 0
    assert node.loaded()[QWEN]["expires_at"] >= "2300"
    import ollama

    with ollama.Client(host=node.url) as client:
        client.pull(EMBED)  # pulled by hand: not ours to remove
    node.write_config([SMALL])
    server.reset_requests()
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert node.installed() >= {SMALL, EMBED}
    assert QWEN not in node.installed()
    assert QWEN not in node.loaded()
    calls = [(r["method"], r["path"], r.get("body") or {}) for r in server.requests()]
    unload = next(
        i for i, c in enumerate(calls) if c[1] == "/api/generate" and c[2].get("keep_alive") == 0
    )
    delete = next(i for i, c in enumerate(calls) if c[1] == "/api/delete")
    assert unload < delete
    assert not any(c[1] == "/api/delete" and c[2].get("model") == EMBED for c in calls)


def test_pin_and_unpin(node: Node) -> None:
    node.write_config([{"name": SMALL, "keep_alive": "forever"}])
    assert node.run("apply", "--yes").returncode == 0
    assert node.loaded()[SMALL]["expires_at"] >= "2300"
    assert node.run("plan", "--detailed-exitcode").returncode == 0
    node.write_config([{"name": SMALL, "keep_alive": "10m"}])
    doc = _plan(node)
    assert [(a["op"], a["model"]) for a in doc["actions"]] == [("unpin", SMALL)]
    assert node.run("apply", "--yes").returncode == 0
    assert node.loaded().get(SMALL, {}).get("expires_at", "") < "2300"


def test_backend_unreachable_is_one_line(node: Node) -> None:
    node.url = "http://127.0.0.1:9"  # discard port: nothing listens
    node.write_config([SMALL])
    out = node.run("plan")
    assert out.returncode == 1
    assert "can't reach Ollama at http://127.0.0.1:9" in out.stdout + out.stderr
    assert "OLLAMA_HOST" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_missing_upstream_model(node: Node) -> None:
    node.write_config(["nosuchmodel:7b"])
    out = node.run("plan")
    assert out.returncode == 1
    assert "nosuchmodel:7b" in out.stdout and "not in the registry" in out.stdout
    assert "Traceback" not in out.stderr


def test_quantization_mismatch_downloads_nothing(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([{"name": "llama3.2:1b", "quantization": "Q8_0"}])
    server.reset_requests()
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert "asserts quantization Q8_0" in out.stdout + out.stderr
    assert not any(r["path"] == "/api/pull" for r in server.requests())


def test_error_mid_pull_fails_that_model_only(node: Node) -> None:
    server = needs_fake(node)
    server.fault(QWEN, "error_mid", after_bytes=1000)
    node.write_config([QWEN, SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert f"pull {QWEN}" in out.stderr and "max retries exceeded" in out.stderr
    assert "Traceback" not in out.stderr
    assert SMALL in node.installed()
    assert QWEN not in node.installed()
    server.clear_faults()
    assert node.run("apply", "--yes").returncode == 0
    assert QWEN in node.installed()


def test_pull_failure_holds_back_removals(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    assert node.run("apply", "--yes").returncode == 0
    server.fault(QWEN, "not_found")
    node.write_config([QWEN])
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert SMALL in node.installed(), "make before break: the old model must stay"


def test_stalled_pull_is_failed_by_the_watchdog(node: Node) -> None:
    server = needs_fake(node)
    server.fault(SMALL, "stall", after_bytes=100)
    node.env["INFERNET_PULL_STALL_TIMEOUT"] = "1"
    node.write_config([SMALL])
    started = time.monotonic()
    out = node.run("apply", "--yes", timeout=60)
    assert out.returncode == 1
    assert "stalled" in out.stderr
    assert time.monotonic() - started < 30


def test_saved_plan_applied_exactly_or_refused_when_stale(node: Node) -> None:
    node.write_config([SMALL])
    plan_file = node.tmp / "plan.json"
    assert node.run("plan", "--out", str(plan_file)).returncode == 0
    assert node.run("apply", str(plan_file), "--yes").returncode == 0
    node.write_config([SMALL, QWEN])
    assert node.run("plan", "--out", str(plan_file)).returncode == 0
    import ollama

    with ollama.Client(host=node.url) as client:
        client.pull(EMBED)  # the node changes behind the plan's back
    out = node.run("apply", str(plan_file), "--yes")
    assert out.returncode == 1
    assert "changed since the plan" in out.stderr
    assert QWEN not in node.installed()


def test_apply_refuses_without_yes_off_a_terminal(node: Node) -> None:
    node.write_config([SMALL])
    out = node.run("apply")
    assert out.returncode == 1
    assert "pass --yes" in out.stderr
    assert SMALL not in node.installed()


def test_invalid_file_never_acts(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    node.config.write_text(node.config.read_text() + "policy: {prune: all\n")  # half-written
    server.reset_requests()
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert str(node.config) in out.stderr
    assert server.requests() == []


def test_two_applies_at_once(node: Node) -> None:
    node.throttle(20_000)  # the first apply holds the lock while its pull crawls
    node.write_config([QWEN])
    first = node.popen("apply", "--yes")
    time.sleep(1.5)
    second = node.run("apply", "--yes")
    assert second.returncode == 1
    assert f"PID {first.pid}" in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=20)


def test_killed_apply_is_rolled_forward(node: Node) -> None:
    server = node.throttle(20_000)
    node.write_config([QWEN])
    first = node.popen("apply", "--yes")
    deadline = time.monotonic() + 30  # a loaded machine may take a while to get there
    while not any(r["path"] == "/api/pull" for r in server.requests()):
        assert time.monotonic() < deadline, "the apply never started its pull"
        time.sleep(0.05)
    time.sleep(0.3)  # the pull is journalled before it is sent; now it is in flight
    first.kill()
    first.communicate(timeout=10)
    assert QWEN not in node.installed()
    out = node.run("apply", "--yes", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rolling forward an interrupted apply" in out.stderr
    assert QWEN in node.installed()


def test_corrupt_state_db_makes_models_unmanaged(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    (node.state / "state.db").write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        (node.state / f"state.db{suffix}").unlink(missing_ok=True)
    node.write_config([SMALL])
    out = node.run("plan", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["actions"] == [], "a lost store must never cause a removal"
    assert any("state" in w for w in doc["warnings"])


def test_model_install_and_remove_edit_the_file(node: Node) -> None:
    node.throttle(200_000)  # slow enough for progress lines
    node.write_config([SMALL])
    node.config.write_text("# my node\n" + node.config.read_text())
    out = node.run("model", "install", QWEN, "--verbose")
    assert out.returncode == 0, out.stderr
    assert "%" in out.stderr and "B/s" in out.stderr
    text = node.config.read_text()
    assert text.startswith("# my node\n") and QWEN in text
    assert QWEN in node.installed()
    out = node.run("model", "remove", QWEN, "--yes")
    assert out.returncode == 0, out.stderr
    assert QWEN not in node.config.read_text()
    assert QWEN not in node.installed()
    assert node.config.read_text().startswith("# my node\n")


def test_status_and_model_list(node: Node) -> None:
    node.write_config([SMALL, {"name": EMBED, "keep_alive": "forever"}])
    assert node.run("apply", "--yes").returncode == 0
    out = node.run("status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["advertised"] == [SMALL, EMBED]
    assert doc["drift"] == []
    assert doc["last_apply"]["converged"] is True
    out = node.run("model", "list", "--json")
    rows = {r["model"]: r["status"] for r in json.loads(out.stdout)["models"]}
    assert rows[SMALL] == "installed"
    assert rows[EMBED] == "pinned"
    human = node.run("model", "list")
    assert "MODEL" in human.stdout and SMALL in human.stdout


def test_validate_prints_file_line_col(node: Node) -> None:
    node.config.write_text("served_models:\n  - name: x:1b\n    keepalive: 5m\n")
    out = node.run("validate")
    assert out.returncode == 1
    assert f"{node.config}:3:5:" in out.stderr
    assert "did you mean 'keep_alive'" in out.stderr
