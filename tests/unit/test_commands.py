"""Remote commands (reconciler.daemon): strict names, policy, progress, cancel, exactly once.

The runner talks to the real control-plane test server (which verifies every signature and
keeps the command rows as the real one does), a real state store and a real infernet.yaml;
only the reconcile is a fake, so each test decides what the "apply" did.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler import names
from reconciler.config import desired
from reconciler.controlplane.args import NO_HF, model_problem, name_problem
from reconciler.controlplane.client import ControlPlane
from reconciler.controlplane.identity import generate_key, load_key
from reconciler.daemon import verbs
from reconciler.daemon.commands import INTERRUPTED, REJECTED, CommandRunner, settle_interrupted
from reconciler.daemon.verbs import CANCELLED, ReconcileOutcome
from reconciler.events import Event, Kind, Progress
from reconciler.model import Action, BackendKind, ControlPlaneSettings, Op
from state import StatusKey, Store
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane

OLLAMA, LLAMACPP, VLLM = BackendKind.OLLAMA, BackendKind.LLAMACPP, BackendKind.VLLM

# --------------------------------------------------------------------------- names

GOOD = [
    (OLLAMA, "qwen2.5:14b"),
    (OLLAMA, "llama3.2"),
    (OLLAMA, "library/qwen2.5:0.5b"),
    (OLLAMA, "registry.ollama.ai/library/qwen2.5:7b"),
    (OLLAMA, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
    (LLAMACPP, "qwen2.5-7b-instruct-q4_k_m.gguf"),
    (VLLM, "Qwen/Qwen2.5-7B-Instruct"),
    (BackendKind.SGLANG, "meta-llama/Llama-3.1-8B-Instruct"),
]

BAD: list[tuple[BackendKind, object, str]] = [
    (OLLAMA, "qwen 2.5", "whitespace"),
    (OLLAMA, " qwen2.5", "whitespace"),
    (OLLAMA, "qwen2.5\t", "whitespace"),
    (OLLAMA, "qwen2.5\n:7b", "whitespace"),
    (OLLAMA, "qwen\u00a0coder", "whitespace"),
    (OLLAMA, "qwen\x00", "control"),
    (OLLAMA, "qwen\x1b[31m", "control"),
    (OLLAMA, "qwen\u200b2.5", "invisible"),
    (OLLAMA, "qwen\u202e2.5", "invisible"),
    (OLLAMA, "../x", "file path"),
    (OLLAMA, "library/../qwen", "file path"),
    (OLLAMA, "/etc/passwd", "file path"),
    (OLLAMA, "~/models/x", "file path"),
    (OLLAMA, "models\\x", "file path"),
    (LLAMACPP, "../x.gguf", "file path"),
    (LLAMACPP, "/var/lib/models/x.gguf", "file path"),
    (VLLM, "org/../repo", "file path"),
    (OLLAMA, "a" * 201, "at most 200"),
    (VLLM, "o/" + "r" * 300, "at most 200"),
    (OLLAMA, "", "empty"),
    (OLLAMA, None, "not NoneType"),
    (OLLAMA, 7, "not int"),
    (OLLAMA, ["qwen2.5"], "not list"),
    (OLLAMA, {"name": "x"}, "not dict"),
    # Each backend's own grammar on top of the shared checks.
    (OLLAMA, "qwen2.5@sha256:abc", "digest"),
    (OLLAMA, "a/b/c/d", "too many"),
    (LLAMACPP, "qwen2.5:7b", "GGUF"),
    (LLAMACPP, "sub/x.gguf", "GGUF"),
    (VLLM, "just-a-name", "org/repo"),
    (VLLM, "org/repo/extra", "org/repo"),
]


@pytest.mark.parametrize(("backend", "name"), GOOD, ids=[n for _, n in GOOD])
def test_good_names(backend: BackendKind, name: str) -> None:
    assert model_problem(name, backend) is None


@pytest.mark.parametrize(("backend", "name", "reason"), BAD, ids=[repr(n)[:40] for _, n, _ in BAD])
def test_bad_names(backend: BackendKind, name: object, reason: str) -> None:
    problem = model_problem(name, backend)
    assert problem is not None
    assert reason in problem
    assert "\n" not in problem and len(problem) < 400


def test_length_limit_is_the_heartbeats() -> None:
    assert name_problem("a" * 200) is None
    assert name_problem("a" * 201) is not None
    assert name_problem(7, field="hf") == "args.hf must be a model name (a string), not int"


# --------------------------------------------------------------------------- the runner

CONFIG = """\
# the node's models (a comment the edits must keep)
served_models:
  - llama3.2:3b          # small and fast
  - name: qwen2.5:0.5b
    protect: true        # never removed remotely
control_plane:
  url: http://127.0.0.1:9
  key_file: /nonexistent/node.key
  commands: {policy}
{extra}"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeReconcile:
    """Reads the file like the daemon does and "applies" it; ``script`` runs in the middle."""

    config: Path
    calls: list[frozenset[str]] = field(default_factory=list)
    script: Any = None  # (progress, cancel) -> None
    error: str | None = None
    advertised: tuple[str, ...] | None = None  # None: what the file lists

    def __call__(
        self, progress: Progress, cancel: threading.Event, force: frozenset[str]
    ) -> ReconcileOutcome:
        self.calls.append(force)
        state = desired.load(self.config)
        if self.script is not None:
            self.script(progress, cancel)
        if self.error is not None:
            return ReconcileOutcome(False, (), self.error)
        advertised = self.advertised
        if advertised is None:
            advertised = tuple(m.advertise_as for m in state.models)
        progress(Event(Kind.CONVERGED, outcome="converged"))
        return ReconcileOutcome(True, advertised, None)


@dataclass
class Node:
    cp: ControlPlaneServer
    pubkey: str
    client: ControlPlane
    store: Store
    config: Path
    clock: FakeClock
    reconcile: FakeReconcile

    def write(self, policy: str = "edit", extra: str = "") -> str:
        text = CONFIG.format(policy=policy, extra=extra)
        self.config.write_text(text)
        return text

    def runner(self, **kw: Any) -> CommandRunner:
        return CommandRunner(
            client=self.client,
            store=self.store,
            config_path=self.config,
            reconcile=self.reconcile,
            clock=self.clock,
            **kw,
        )

    def send(self, command: str, **args: Any) -> str:
        return self.cp.enqueue_command(self.pubkey, command, args)

    def run(self, command: str, **args: Any) -> dict[str, Any]:
        """Enqueue one command, run one tick, return the command's row on the server."""
        command_id = self.send(command, **args)
        assert self.runner().run_pending() == [command_id]
        return self.cp.command(command_id)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    pubkey = generate_key(tmp_path / "node.key")
    cp = start_control_plane(tmp_path / "cp")
    try:
        client = ControlPlane(ControlPlaneSettings(url=cp.url), load_key(tmp_path / "node.key"))
        store = Store.open(tmp_path / "state")
        config = tmp_path / "infernet.yaml"
        n = Node(cp, pubkey, client, store, config, FakeClock(), FakeReconcile(config))
        n.write()
        yield n
        store.close()
        client.close()
    finally:
        cp.close()


def _answered(node: Node, command_id: str) -> None:
    """The ledger has the command finished and its answer delivered, exactly once."""
    record = node.store.command_seen(command_id)
    assert record is not None and record.state in ("completed", "failed")
    assert record.reported_at is not None
    assert node.cp.command(command_id)["complete_calls"] == 1
    assert node.store.unreported_commands() == []


def test_reject_policy_fails_every_command_before_anything_runs(node: Node) -> None:
    before = node.write(policy="reject")
    for verb in ("model_install", "model_remove"):
        row = node.run(verb, model="mistral:7b")
        assert (row["status"], row["error"]) == ("failed", REJECTED)
        assert row["progress_posts"] == 0
        _answered(node, row["id"])
    assert node.reconcile.calls == []
    assert node.config.read_text() == before


def test_unknown_verb_is_unsupported(node: Node) -> None:
    row = node.run("train_shard", shard_url="https://x/s", base_model="llama3.2:3b")
    assert row["status"] == "failed"
    assert row["error"].startswith("unsupported command 'train_shard'")
    assert node.reconcile.calls == []
    record = node.store.command_seen(row["id"])
    assert record is not None and record.verb == "train_shard"
    assert record.payload == {"shard_url": "https://x/s", "base_model": "llama3.2:3b"}
    _answered(node, row["id"])


def test_a_verb_is_one_entry_in_the_table_and_one_handler(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    def node_echo(ctx: verbs.Context) -> verbs.Answer:
        ctx.progress.stage("echo", "echoing", 1)
        return verbs.Answer(
            "completed", {"echo": ctx.args.get("text"), "models": len(ctx.current.models)}
        )

    monkeypatch.setitem(verbs.VERBS, "node_echo", node_echo)
    row = node.run("node_echo", text="hi")
    assert (row["status"], row["result"]) == ("completed", {"echo": "hi", "models": 2})
    assert row["progress_posts"] == 1
    _answered(node, row["id"])
    unknown = node.run("node_nothing")
    assert unknown["error"] == (
        "unsupported command 'node_nothing': this node runs only model_install, model_remove "
        "and node_echo"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"model": "../etc/passwd"}, "looks like a file path"),
        ({"model": "qwen 2.5"}, "whitespace"),
        ({"model": "x" * 201}, "at most 200"),
        ({"model": ""}, "empty"),
        ({}, "not NoneType"),
        ({"model": 3}, "not int"),
        ({"model": "qwen2.5@sha256:00"}, "digest"),
    ],
)
def test_invalid_names_are_failed_with_the_reason(
    node: Node, args: dict[str, Any], reason: str
) -> None:
    before = node.config.read_text()
    for verb in ("model_install", "model_remove"):
        row = node.run(verb, **args)
        assert row["status"] == "failed"
        assert reason in row["error"], row["error"]
        assert row["progress_posts"] == 0
    assert node.reconcile.calls == []
    assert node.config.read_text() == before


def test_an_invalid_file_fails_commands_until_fixed(node: Node) -> None:
    node.config.write_text("served_models: [llama3.2:3b, 'bad name']\n")
    row = node.run("model_install", model="mistral:7b")
    assert row["status"] == "failed"
    error = row["error"]
    assert error.startswith("infernet.yaml is invalid right now: ")
    assert str(node.config) + ":1:" in error and "bad name" in error
    assert error.endswith("; fix it before sending commands")
    assert node.reconcile.calls == []


def test_install_edits_the_file_reconciles_and_reports(node: Node) -> None:
    def pull(progress: Progress, cancel: threading.Event) -> None:
        action = Action(Op.PULL, "mistral:7b", OLLAMA, names.canonical(OLLAMA, "mistral:7b"), "")
        progress(Event(Kind.STARTED, action))
        for done in range(0, 101, 10):
            progress(Event(Kind.PROGRESS, action, phase="pulling ff82", completed=done, total=100))
            node.clock.now += 0.5
        progress(Event(Kind.FINISHED, action, outcome="ok"))

    node.reconcile.script = pull
    row = node.run("model_install", model="mistral:7b")
    assert row["status"] == "completed", row["error"]
    assert row["result"] == {
        "model": "mistral:7b",
        "backend": "ollama",
        "advertised": ["llama3.2:3b", "qwen2.5:0.5b", "mistral:7b"],
    }
    assert node.reconcile.calls == [frozenset()]
    text = node.config.read_text()
    assert text.startswith("# the node's models (a comment the edits must keep)\n")
    assert "  - llama3.2:3b          # small and fast\n" in text
    assert "  - mistral:7b\n" in text
    assert "mistral:7b" in [m.name for m in desired.load(node.config).models]
    # Posts: the config stage, the download phase, then one per 2 s of 5.5 s, the check phase.
    assert 4 <= row["progress_posts"] <= 6
    assert row["progress"]["phase"] == "check" and row["progress"]["pct"] == 100
    assert row["progress"]["steps"] == 3
    _answered(node, row["id"])


def test_installing_a_model_already_in_the_file_changes_nothing(node: Node) -> None:
    before = node.config.read_text()
    row = node.run("model_install", model="Llama3.2:3b")
    assert row["status"] == "completed"
    assert row["result"]["note"] == "llama3.2:3b was already in infernet.yaml"
    assert node.config.read_text() == before


def test_a_failed_install_is_taken_back_out_of_the_file(node: Node) -> None:
    before = node.config.read_text()
    node.reconcile.error = "'nosuch:1b' is not in the registry: file does not exist"
    row = node.run("model_install", model="nosuch:1b")
    assert (row["status"], row["error"]) == ("failed", node.reconcile.error)
    assert node.config.read_text() == before
    _answered(node, row["id"])


def test_an_install_that_is_not_advertised_fails(node: Node) -> None:
    before = node.config.read_text()
    node.reconcile.advertised = ("llama3.2:3b", "qwen2.5:0.5b")  # e.g. it doesn't fit the VRAM
    row = node.run("model_install", model="mistral:7b")
    assert row["status"] == "failed"
    assert row["error"] == "mistral:7b is not advertised after the apply"
    assert node.config.read_text() == before


def test_hf_install_needs_a_vllm_node(node: Node) -> None:
    before = node.config.read_text()
    row = node.run("model_install", model="qwen-7b", hf="Qwen/Qwen2.5-7B-Instruct")
    assert (row["status"], row["error"]) == ("failed", NO_HF)
    row = node.run("model_install", model="hf:Qwen/Qwen2.5-7B-Instruct")
    assert (row["status"], row["error"]) == ("failed", NO_HF)
    assert node.config.read_text() == before
    assert node.reconcile.calls == []


def test_hf_install_on_a_vllm_node_adds_the_repo_advertised_as_the_model(node: Node) -> None:
    node.config.write_text(
        "served_models: ['Qwen/Qwen2.5-0.5B']\ndefault_backend: vllm\n"
        "control_plane: {url: 'http://127.0.0.1:9'}\n"
    )
    row = node.run("model_install", model="qwen-7b", hf="Qwen/Qwen2.5-7B-Instruct")
    assert row["status"] == "completed", row["error"]
    assert row["result"]["backend"] == "vllm"
    assert "qwen-7b" in row["result"]["advertised"]
    spec = desired.load(node.config).models[-1]
    assert (spec.name, spec.backend, spec.advertise_as) == (
        "Qwen/Qwen2.5-7B-Instruct",
        VLLM,
        "qwen-7b",
    )
    bad = node.run("model_install", model="x", hf="../../etc")
    assert bad["status"] == "failed" and "file path" in bad["error"]


def test_remove_edits_the_file_and_lets_the_prune_policy_decide(node: Node) -> None:
    def remove(progress: Progress, cancel: threading.Event) -> None:
        canonical = names.canonical(OLLAMA, "llama3.2:3b")
        action = Action(Op.REMOVE, "llama3.2:3b", OLLAMA, canonical, "removed by name")
        progress(Event(Kind.STARTED, action))
        progress(Event(Kind.FINISHED, action, outcome="ok"))

    node.reconcile.script = remove
    row = node.run("model_remove", model="llama3.2:3b")
    assert row["status"] == "completed", row["error"]
    assert row["result"] == {
        "model": "llama3.2:3b",
        "removed": ["llama3.2:3b"],
        "advertised": ["qwen2.5:0.5b"],
    }
    assert node.reconcile.calls == [frozenset()]  # nothing forced: a plain edit of the file
    text = node.config.read_text()
    assert "llama3.2" not in text and text.startswith("# the node's models")
    _answered(node, row["id"])


def test_remove_of_an_unknown_model_is_a_noop_answered_completed(node: Node) -> None:
    before = node.config.read_text()
    row = node.run("model_remove", model="mistral:7b")
    assert row["status"] == "completed"
    assert row["result"]["note"] == (
        "mistral:7b is not in infernet.yaml; nothing deleted (infernet did not install it, "
        "and policy.prune: managed deletes only what it did)"
    )
    assert node.config.read_text() == before
    assert node.reconcile.calls == [frozenset()]


def test_protected_models_are_never_removed_remotely(node: Node) -> None:
    before = node.config.read_text()
    row = node.run("model_remove", model="qwen2.5:0.5b")
    assert row["status"] == "failed"
    assert "qwen2.5:0.5b is protect: true in infernet.yaml" in row["error"]
    # Still protected after it left the file (the session remembers it until it's gone).
    node.store.put_status(StatusKey.PROTECTED, ["ollama:registry.ollama.ai/library/gemma3:1b"])
    row = node.run("model_remove", model="gemma3:1b")
    assert row["status"] == "failed" and "protect: true" in row["error"]
    assert node.reconcile.calls == []
    assert node.config.read_text() == before


def test_cancel_from_the_dashboard_stops_the_work_and_reverts_the_file(node: Node) -> None:
    before = node.config.read_text()
    seen: list[bool] = []

    def slow_pull(progress: Progress, cancel: threading.Event) -> None:
        action = Action(Op.PULL, "mistral:7b", OLLAMA, names.canonical(OLLAMA, "mistral:7b"), "")
        progress(Event(Kind.STARTED, action))
        node.cp.cancel(command_id)  # the owner presses cancel mid-download
        for done in range(100):
            node.clock.now += 1.0
            progress(Event(Kind.PROGRESS, action, phase="pulling ff82", completed=done, total=100))
            if cancel.is_set():
                break
        seen.append(cancel.is_set())
        progress(Event(Kind.FINISHED, action, outcome="failed", message="pull cancelled"))

    node.reconcile.script = slow_pull
    command_id = node.send("model_install", model="mistral:7b")
    assert node.runner().run_pending() == [command_id]
    assert seen == [True]
    record = node.store.command_seen(command_id)
    assert record is not None and (record.state, record.error) == ("failed", CANCELLED)
    assert node.config.read_text() == before  # nobody wants the model any more
    row = node.cp.command(command_id)
    assert row["status"] == "cancelled"  # our failed answer was the server's no-op
    _answered(node, command_id)


def test_progress_is_posted_at_most_every_interval_plus_phase_changes(node: Node) -> None:
    posts: list[int] = []

    def pull(progress: Progress, cancel: threading.Event) -> None:
        action = Action(Op.PULL, "mistral:7b", OLLAMA, names.canonical(OLLAMA, "mistral:7b"), "")
        progress(Event(Kind.STARTED, action))  # phase: download
        posts.append(node.cp.command(command_id)["progress_posts"])
        for done in range(50):  # no time passes: no posts
            progress(Event(Kind.PROGRESS, action, phase="pulling ff82", completed=done, total=99))
        posts.append(node.cp.command(command_id)["progress_posts"])
        node.clock.now += 2.0
        progress(Event(Kind.PROGRESS, action, phase="pulling ff82", completed=60, total=99))
        posts.append(node.cp.command(command_id)["progress_posts"])
        progress(Event(Kind.PROGRESS, action, phase="verifying sha256 digest"))  # new phase
        posts.append(node.cp.command(command_id)["progress_posts"])

    node.reconcile.script = pull
    command_id = node.send("model_install", model="mistral:7b")
    node.runner().run_pending()
    assert posts == [2, 2, 3, 4]
    progress = node.cp.command(command_id)["progress"]
    assert progress["phase"] == "check"


def test_a_command_cut_off_by_a_crash_is_answered_failed_never_rerun(node: Node) -> None:
    command_id = node.send("model_install", model="mistral:7b")
    # The killed process: claimed it, entered it in the ledger, started it, then died.
    (claimed,) = node.client.poll_commands()
    node.store.record_command(command_id=claimed.id, verb=claimed.command, payload=claimed.args)
    node.store.set_command_state(claimed.id, state="running")

    assert node.runner().run_pending() == []
    row = node.cp.command(command_id)
    assert (row["status"], row["error"]) == ("failed", INTERRUPTED)
    assert node.reconcile.calls == []
    _answered(node, command_id)
    node.runner().run_pending()
    assert node.cp.command(command_id)["complete_calls"] == 1


def test_answers_wait_in_the_outbox_while_the_control_plane_is_down(node: Node) -> None:
    node.reconcile.script = lambda progress, cancel: node.cp.set_down(60)
    command_id = node.send("model_install", model="mistral:7b")
    runner = node.runner()
    assert runner.run_pending() == [command_id]  # ran; its answer hit a 503
    record = node.store.command_seen(command_id)
    assert record is not None and record.state == "completed" and record.reported_at is None
    assert node.cp.command(command_id)["status"] == "running"

    assert runner.run_pending() == []  # still down: kept, nothing raised
    assert runner.deliver_pending() == 0
    node.cp.set_down(None)
    assert runner.run_pending() == []  # back: the outbox drains first
    row = node.cp.command(command_id)
    assert row["status"] == "completed" and row["result"]["model"] == "mistral:7b"
    assert len(node.reconcile.calls) == 1  # never run twice
    _answered(node, command_id)


def test_a_new_runner_after_a_restart_delivers_what_the_old_one_owed(node: Node) -> None:
    node.reconcile.script = lambda progress, cancel: node.cp.set_down(60)
    command_id = node.send("model_remove", model="mistral:7b")
    node.runner().run_pending()
    node.cp.set_down(None)
    assert node.runner().deliver_pending() == 1
    assert node.cp.command(command_id)["status"] == "completed"
    assert len(node.reconcile.calls) == 1
    _answered(node, command_id)


def test_a_crashing_reconcile_is_answered_failed(node: Node) -> None:
    def boom(progress: Progress, cancel: threading.Event) -> None:
        raise RuntimeError("bug\nin two lines")

    before = node.config.read_text()
    node.reconcile.script = boom
    row = node.run("model_install", model="mistral:7b")
    assert row["status"] == "failed"
    assert row["error"] == "internal error in infernet: RuntimeError: bug in two lines"
    assert node.config.read_text() == before


def test_an_answer_the_control_plane_has_no_row_for_is_dropped(node: Node) -> None:
    # E.g. the owner's row was deleted: its own JSON 404 means nobody awaits the answer.
    node.store.record_command(command_id="gone-1", verb="model_remove", payload={"model": "x"})
    node.store.set_command_state("gone-1", state="completed", result={"model": "x"})
    assert node.runner().deliver_pending() == 1
    assert node.store.unreported_commands() == []


# --------------------------------------------------------------------------- undoing an install


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs."""


def _killed_mid_install(node: Node, model: str) -> str:
    def die(progress: Progress, cancel: threading.Event) -> None:
        raise Killed

    node.reconcile.script = die
    command_id = node.send("model_install", model=model)
    with pytest.raises(Killed):
        node.runner().run_pending()
    assert model in [m.name for m in desired.load(node.config).models]  # the edit happened
    node.reconcile.script = None
    return command_id


def test_an_install_cut_off_by_a_crash_is_taken_back_out_of_the_file(node: Node) -> None:
    before = node.config.read_bytes()
    command_id = _killed_mid_install(node, "mistral:7b")
    assert node.runner().run_pending() == []  # the restarted daemon's first tick
    row = node.cp.command(command_id)
    assert (row["status"], row["error"]) == ("failed", INTERRUPTED)
    assert node.config.read_bytes() == before, "answered failed, so not in the file either"
    assert node.reconcile.calls == [frozenset()], "never run again"
    assert node.store.get_status(StatusKey.COMMAND_UNDO) == {}
    _answered(node, command_id)


def test_undoing_a_cut_off_install_keeps_what_someone_edited_since(node: Node) -> None:
    command_id = _killed_mid_install(node, "mistral:7b")
    from reconciler.config import edit as configedit

    configedit.add_model(node.config, "phi3:mini")  # the owner edits the file meanwhile
    edited = node.config.read_text()
    assert settle_interrupted(node.store, node.config) == [command_id]
    text = node.config.read_text()
    assert [m.name for m in desired.load(node.config).models] == [
        "llama3.2:3b",
        "qwen2.5:0.5b",
        "phi3:mini",
    ]
    assert text == edited.replace("  - mistral:7b\n", "")


def test_a_failed_install_restores_the_file_byte_for_byte(node: Node) -> None:
    before = ("\ufeff" + CONFIG.format(policy="edit", extra="")).replace("\n", "\r\n").encode()
    node.config.write_bytes(before)
    node.reconcile.error = "'nosuch:1b' is not in the registry: file does not exist"
    row = node.run("model_install", model="nosuch:1b")
    assert row["status"] == "failed"
    assert node.config.read_bytes() == before
