"""Campaign 7: Hypothesis fuzzing of ``infernet.yaml`` and of remote command payloads.

* Generated documents (valid ones and their mutations: keys deleted or duplicated, values of
  the wrong type, truncation at any byte, unicode, huge numbers, invalid UTF-8) go through
  ``desired.load``: a ``Desired`` or a ``ConfigError`` whose message is one line naming the
  file; never another exception.
* Remote command payloads go through the real ``CommandRunner`` with a recording client and
  reconcile: every command is answered exactly once, a payload ``commandargs`` refuses is
  answered ``failed`` with no reconcile and no edit of the file, and the runner never crashes.
* A handful of invalid documents through the real CLI: ``apply --yes`` exits 1 and the backend
  sees no pull and no delete.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.config import desired
from reconciler.controlplane import args as commandargs
from reconciler.controlplane.client import RemoteCommand
from reconciler.converge import edits
from reconciler.daemon.commands import CommandRunner
from reconciler.daemon.verbs import ReconcileOutcome
from reconciler.errors import ConfigError, ValidationError
from reconciler.events import Progress
from reconciler.model import Desired
from state import Store
from tests.faults.conftest import fuzz_examples, installed, write_config
from tests.integration.conftest import Node

pytestmark = pytest.mark.faults

FILES = fuzz_examples(2000)
PAYLOADS = max(1, FILES // 3)  # each example is 1-4 commands


def _settings(examples: int) -> settings:
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=quiet,
    )


COUNTS: Counter[str] = Counter()

NAMES = [
    "qwen2.5:0.5b",
    "llama3.2:1b",
    "smollm2:135m",
    "Llama3.2",
    "hf.co/a/b:Q4_K_M",
    "tiny.gguf",
    "org/repo",
    "x" * 250,
    "../etc/passwd",
    "a b",
    "ünï:cødé",
    "",
]
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["1e309", "-1", "0", "forever", "99999999999999999999GiB", "10m", "~"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
SIZES = st.sampled_from(["24GiB", "1GiB", "auto", "0", "10GB", "512MiB", 10**12])
ENTRY = st.one_of(
    st.sampled_from(NAMES),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES)},
        optional={
            "backend": st.sampled_from(["ollama", "llamacpp", "vllm", "sglang", "max", "nope"]),
            "keep_alive": st.sampled_from([-1, 0, "forever", "10m", "1h", 300, "soon"]),
            "quantization": st.sampled_from(["Q4_K_M", "Q8_0", "F16", "q4"]),
            "context": st.integers(min_value=-5, max_value=10**7),
            "advertise_as": st.sampled_from(NAMES),
            "vram": SIZES,
            "protect": st.booleans(),
            "source": st.sampled_from(
                ["file:///m/x.gguf", "hf://a/b/c.gguf", "ftp://x", "https://h/x.gguf"]
            ),
            "sha256": st.sampled_from(["0" * 64, "sha256:" + "a" * 64, "zz"]),
        },
    ),
)
DOC = st.fixed_dictionaries(
    {"served_models": st.lists(ENTRY, max_size=5)},
    optional={
        "version": st.sampled_from([1, 2, "1"]),
        "default_backend": st.sampled_from(["ollama", "llamacpp", "vllm", "nope"]),
        "budget": st.fixed_dictionaries(
            {}, optional={"vram": SIZES, "reserve": SIZES, "disk_reserve": SIZES}
        ),
        "policy": st.fixed_dictionaries(
            {},
            optional={
                "prune": st.sampled_from(["managed", "all", "none", "some"]),
                "max_removals": st.integers(min_value=-3, max_value=10**20),
                "allow_empty": st.booleans(),
                "parallel_pulls": st.integers(-1, 64),
                "updates": st.sampled_from(["notify", "follow", "x"]),
                "self_heal": st.booleans(),
            },
        ),
        "backends": st.fixed_dictionaries(
            {},
            optional={
                "ollama": st.fixed_dictionaries(
                    {},
                    optional={
                        "url": st.sampled_from(
                            ["http://127.0.0.1:11434", "127.0.0.1:11434", "ftp://x", ""]
                        )
                    },
                ),
            },
        ),
        "control_plane": st.fixed_dictionaries(
            {},
            optional={
                "url": st.sampled_from(["https://cp.example", "http://x", "nope"]),
                "heartbeat_interval": st.sampled_from(["1s", "30s", -1, "never"]),
                "commands": st.sampled_from(["edit", "reject", "maybe"]),
            },
        ),
    },
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if delete:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, bytes]:
    """(how it was made, the file's bytes)."""
    doc = draw(DOC)
    how = draw(
        st.sampled_from(
            [
                "valid-ish",
                "delete",
                "wrong-type",
                "duplicate",
                "truncate",
                "unicode",
                "huge",
                "bytes",
                "yaml-junk",
            ]
        )
    )
    paths = _paths(doc)
    if how in ("delete", "wrong-type", "huge") and paths:
        path = draw(st.sampled_from(paths))
        if how == "delete":
            _set(doc, path, None, delete=True)
        else:
            big = draw(st.sampled_from([10**400, -(10**400), 2**63, 1e308, float("inf")]))
            _set(doc, path, big if how == "huge" else draw(WEIRD))
    try:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except (OverflowError, ValueError):
        text = "served_models: []\n"
    data = text.encode()
    if how == "duplicate" and text.strip():
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        data = "".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]).encode()
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "unicode":
        at = draw(st.integers(0, len(text)))
        data = (text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]).encode(
            "utf-8", "surrogatepass"
        )
    elif how == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif how == "yaml-junk":
        junk = draw(
            st.sampled_from(
                [
                    "&a [*a]",
                    "!!python/object:os.system x",
                    "{",
                    "- - -",
                    "\t",
                    "key: @",
                    "? [a]\n: b",
                    "<<: *x",
                    "%YAML 9.9",
                ]
            )
        )
        at = draw(st.integers(0, len(data)))
        data = data[:at] + junk.encode() + data[at:]
    return how, data


_DIR = Path(tempfile.mkdtemp(prefix="infernet-fuzz-"))
_SERIAL = itertools.count()


def _classified(path: Path) -> tuple[str, Desired | ConfigError | BaseException]:
    """``desired.load(path)`` as ``(outcome, value)``: ``valid`` with the Desired, ``invalid``
    (a ValidationError), ``error`` (another ConfigError), or ``crash`` with what else it
    raised. The checks run on the value afterwards, outside any ``except`` block: a failed
    check is then an AssertionError about the file, never shown as raised "during handling"
    of the ValidationError it examines (which reads as an uncaught ValidationError)."""
    try:
        return "valid", desired.load(path)
    except ValidationError as exc:
        return "invalid", exc
    except ConfigError as exc:
        return "error", exc
    except Exception as exc:
        return "crash", exc


@_settings(FILES)
@given(documents())
def test_fuzzed_files_give_clean_errors_only(made: tuple[str, bytes]) -> None:
    how, data = made
    # A file of its own for every example: nothing another example (or another run) wrote
    # can be read back in its place.
    path = _DIR / f"{next(_SERIAL):06d}" / "infernet.yaml"
    path.parent.mkdir()
    path.write_bytes(data)
    outcome, value = _classified(path)
    shutil.rmtree(path.parent)
    assert outcome != "crash", f"desired.load raised {value!r} on a {how} file: {data!r}"
    if isinstance(value, ValidationError):
        COUNTS[f"file {how}: ValidationError"] += 1
        assert value.problems, f"a ValidationError without problems: {data!r}"
        for problem in value.problems:
            line = str(problem)
            assert "\n" not in line and "\r" not in line, (line, data)
            assert line.startswith(f"{path}:"), (line, data)
    elif isinstance(value, ConfigError):
        COUNTS[f"file {how}: ConfigError"] += 1
        message = str(value)
        assert "\n" not in message, (message, data)
        assert str(path) in message or "infernet.yaml" in message, (message, data)
    else:
        COUNTS[f"file {how}: valid"] += 1
        assert isinstance(value, Desired) and value.source is not None


class _Client:
    """Stands in for ``ControlPlane``: hands out fuzzed commands, records every answer."""

    def __init__(self) -> None:
        self.queue: list[RemoteCommand] = []
        self.answers: Counter[str] = Counter()
        self.last: dict[str, tuple[str, str | None]] = {}

    def poll_commands(self, limit: int = 5) -> list[RemoteCommand]:
        taken, self.queue = self.queue[:limit], self.queue[limit:]
        return taken

    def post_progress(self, command_id: str, progress: dict[str, Any]) -> str:
        return "running"

    def complete(
        self, command_id: str, *, status: str, result: Any = None, error: str | None = None
    ) -> str:
        self.answers[command_id] += 1
        self.last[command_id] = (status, error)
        return status


ARG_VALUE = st.one_of(st.sampled_from(NAMES), WEIRD, st.text(max_size=300))
PAYLOAD = st.dictionaries(
    st.sampled_from(["model", "hf", "backend", "pin", "x"]), ARG_VALUE, max_size=3
)
VERB = st.sampled_from(["model_install", "model_remove", "train_shard", "", "MODEL_INSTALL"])
_BASE = "served_models: [smollm2:135m]\ncontrol_plane: {url: 'https://cp.example'}\n"


# What the commands are checked against, validated once: the property itself never calls the
# validator (whose errors it could then be mistaken for).
_CURRENT = desired.parse(_BASE, path="infernet.yaml")


def _refused(command: RemoteCommand) -> bool:
    """``commandargs`` refuses it before anything runs (or it is no verb of ours)."""
    if command.command == "model_install":
        return isinstance(edits.remote_install(command.args, _CURRENT), str)
    if command.command == "model_remove":
        return commandargs.name_problem(command.args.get("model")) is not None
    return True


@_settings(PAYLOADS)
@given(st.lists(st.tuples(VERB, PAYLOAD), min_size=1, max_size=4), st.data())
def test_fuzzed_command_payloads_are_refused_or_run_once(
    commands: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    work = Path(tempfile.mkdtemp(dir=_DIR))
    try:
        _run_payloads(work, commands, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_payloads(
    work: Path, commands: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    config = work / "infernet.yaml"
    config.write_text(_BASE)
    calls: list[str] = []

    def reconcile(progress: Progress, cancel: threading.Event, force: frozenset[str]) -> Any:
        calls.append(config.read_text())
        current = desired.load(config)  # what it raises is the runner's to contain
        return ReconcileOutcome(True, tuple(m.advertise_as for m in current.models), None)

    client = _Client()
    escaped: Exception | None = None
    with Store.open(work / "state") as store:
        runner = CommandRunner(
            client=client,
            store=store,
            config_path=config,  # type: ignore[arg-type]
            reconcile=reconcile,
            progress_interval=0.0,
        )
        sent = [RemoteCommand(f"c{i}", verb, args) for i, (verb, args) in enumerate(commands)]
        # A command delivered twice (the control plane retried a poll) must not run twice.
        again = data.draw(st.sampled_from([None, *range(len(sent))]))
        client.queue = [*sent, *([sent[again]] if again is not None else [])]
        try:
            while client.queue:
                runner.run_pending()
            runner.deliver_pending()
        except Exception as exc:  # the runner's boundary let it through: a bug there
            escaped = exc
        unreported = store.unreported_commands()
    assert escaped is None, f"the command runner let {escaped!r} escape for {sent}"
    assert unreported == [], unreported
    for command in sent:
        assert client.answers[command.id] == 1, (command, client.answers)
        status, error = client.last[command.id]
        if status == "failed":
            assert error and "\n" not in error, error
            assert "internal error" not in error, (command, error)
    for command in sent:
        refused = _refused(command)
        COUNTS[f"command {command.command or '(empty)'}: {'refused' if refused else 'ran'}"] += 1
        if refused:
            assert client.last[command.id][0] == "failed", (command, client.last[command.id])
    if all(_refused(c) for c in sent):
        assert calls == [], "a refused command must not reconcile"
        assert config.read_text() == _BASE, "a refused command must not edit the file"


INVALID = [
    "served_models: [\n",
    "served_models: [smollm2:135m]\npolicy: {prune: sometimes}\n",
    "served_models: [{name: qwen2.5:0.5b, keepalive: -1}]\n",
    "served_models: 7\n",
    "\x00\x01\x02",
    "",
    "served_models: []\n",  # empty without allow_empty: refused, nothing removed
]


@pytest.mark.integration
def test_invalid_files_through_the_cli_cause_no_action(fnode: Node) -> None:
    server = fnode.server
    assert server is not None
    write_config(fnode, ["smollm2:135m"])
    assert fnode.run("apply", "--yes").returncode == 0
    good = fnode.config.read_text()
    for text in INVALID:
        server.reset_requests()
        fnode.config.write_text(text)
        out = fnode.run("apply", "--yes")
        assert out.returncode == 1, (text, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        acted = [r for r in server.requests() if r["path"] in ("/api/pull", "/api/delete")]
        assert acted == [], (text, acted)
        assert installed(fnode) == {"smollm2:135m"}
        COUNTS["cli invalid file: exit 1, no action"] += 1
    fnode.config.write_text(good)
    assert fnode.run("plan", "--detailed-exitcode").returncode == 0


def test_fuzz_summary() -> None:
    """Prints what the properties above generated (run after them, in file order)."""
    total = sum(n for k, n in COUNTS.items() if k.startswith(("file", "command")))
    print(f"[faults] fuzz: {total} cases: {dict(sorted(COUNTS.items()))}")
