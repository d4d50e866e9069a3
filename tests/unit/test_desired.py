"""Loading and validating infernet.yaml (reconciler.config.desired).

Bad inputs are data: each ``configs/bad/<case>.yaml`` starts with one ``# expect: LINE:COL:
message`` comment per problem, in order, and the one parametrized test below checks them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import backends
from reconciler.backends.hf.settings import HfSettings
from reconciler.backends.llamacpp.settings import LlamacppSettings
from reconciler.backends.ollama import settings as ollama_settings
from reconciler.backends.ollama.settings import OllamaSettings
from reconciler.config import desired, schemacheck
from reconciler.errors import ConfigError, Problem, ValidationError
from reconciler.model import (
    FOREVER,
    BackendKind,
    BudgetSettings,
    ConfigSource,
    ControlPlaneSettings,
    ModelSpec,
    Policy,
)

CONFIGS = Path(__file__).parent / "configs"
REPO = Path(__file__).parents[2]
BAD = sorted((CONFIGS / "bad").glob("*.yaml"))
NO_ENV: dict[str, str] = {}


def _expected(path: Path) -> list[str]:
    prefix = "# expect: "
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def _problems(path: Path) -> list[Problem]:
    with pytest.raises(ValidationError) as caught:
        desired.load(path, env=NO_ENV)
    return caught.value.problems


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_reports_every_problem_located(path: Path) -> None:
    problems = _problems(path)
    assert [f"{p.line}:{p.column}: {p.message}" for p in problems] == _expected(path)
    assert all(p.file == str(path) for p in problems)


def test_bad_cases_cover_the_brief() -> None:
    names = {p.stem for p in BAD}
    assert {
        "malformed",
        "tabs",
        "comments_only",
        "half_written_list",
        "half_written_missing",
        "top_level_list",
        "duplicate_key",
        "unknown_key",
        "bad_backend",
        "type_errors",
        "invalid_names",
        "duplicate_models",
        "advertise_collision",
        "source_on_ollama",
        "revision_non_hf",
        "empty_list",
        "reserve_vram",
    } <= names


def test_problem_prints_as_file_line_col_message() -> None:
    path = CONFIGS / "bad" / "bad_backend.yaml"
    (problem,) = _problems(path)
    assert str(problem) == (
        f"{path}:5:14: served_models[1].backend: 'olama' is not one of "
        "ollama, llamacpp, vllm, sglang, max"
    )


def test_validation_error_message_is_the_first_problem_and_a_count() -> None:
    with pytest.raises(ValidationError) as caught:
        desired.load(CONFIGS / "bad" / "unknown_key.yaml", env=NO_ENV)
    assert str(caught.value).endswith("did you mean 'keep_alive'? (and 2 more)")


def test_problems_are_sorted_by_position() -> None:
    for path in BAD:
        problems = _problems(path)
        assert problems == sorted(problems, key=lambda p: (p.line, p.column))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "1:1: file is empty: expected at least 'served_models: [...]'"),
        ("\n\n   \n", "1:1: file is empty: expected at least 'served_models: [...]'"),
        ("---\n", "1:1: file is empty: expected at least 'served_models: [...]'"),
        (
            "served_models: [a, b",
            "1:21: the file ends unexpectedly inside a [...] list that "
            "starts at line 1, column 16: is it half-written?",
        ),
        (
            "served_models:\n  - name: x\n    keep_alive: '10",
            "3:20: the file ends unexpectedly "
            "inside a quoted string that starts at line 3, column 17: is it half-written?",
        ),
        (
            "policy: {prune: all}\n",
            "1:1: missing required key 'served_models': a list of models, e.g. ['qwen2.5:14b']",
        ),
        (
            "served_models: oops\n",
            "1:16: served_models: expected a list of models, e.g. ['qwen2.5:14b'], got 'oops'",
        ),
        ("served_models:\n\t- a\n", "2:1: tabs are not allowed in YAML indentation; use spaces"),
        (
            "served_models:\n  -\tname: a\n",
            "2:4: tabs are not allowed in YAML indentation; use spaces",
        ),
        ("served_models: [a,\tb]\n", None),  # a tab between flow items is not indentation
        (
            "served_models: [{name: a, context: 8192.0}]\n",
            "1:36: served_models[0].context: expected an integer, got 8192.0",
        ),
        (
            "served_models: [on]\n",
            "1:17: served_models[0]: expected a model name or a mapping "
            "with at least 'name', got true",
        ),
    ],
)
def test_parse_inline(text: str, expected: str | None) -> None:
    if expected is None:
        assert desired.parse(text, path="f.yaml", env=NO_ENV).models
        return
    with pytest.raises(ValidationError) as caught:
        desired.parse(text, path="f.yaml", env=NO_ENV)
    assert [f"{p.line}:{p.column}: {p.message}" for p in caught.value.problems] == [expected]


def test_not_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_bytes(b"served_models:\n  - caf\xe9\n")
    (problem,) = _problems(path)
    assert (problem.line, problem.column) == (2, 8)
    assert problem.message == "the file is not UTF-8 text; save it as UTF-8"


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read .*missing.yaml: No such file"):
        desired.load(tmp_path / "missing.yaml")


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ValidationError) as caught:
        desired.parse("\n".join(lines) + "\nserved_models: [a]\n", path="bomb.yaml", env=NO_ENV)
    messages = [p.message for p in caught.value.problems]
    assert "the file expands to too many values (aliases?); simplify it" in messages


# --------------------------------------------------------------------------- good files


def test_seed_one_liner_means_three_ollama_models_with_defaults() -> None:
    text = 'served_models: ["qwen2.5:14b", "llama3.2:3b", "deepseek-coder:6.7b"]\n'
    got = desired.parse(text, path="infernet.yaml", env=NO_ENV)
    assert got.models == (
        ModelSpec(
            "qwen2.5:14b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/qwen2.5:14b",
            "qwen2.5:14b",
            line=1,
        ),
        ModelSpec(
            "llama3.2:3b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/llama3.2:3b",
            "llama3.2:3b",
            line=1,
        ),
        ModelSpec(
            "deepseek-coder:6.7b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/deepseek-coder:6.7b",
            "deepseek-coder:6.7b",
            line=1,
        ),
    )
    assert got.default_backend is BackendKind.OLLAMA
    assert got.backend_settings == {
        "ollama": OllamaSettings(),
        "llamacpp": LlamacppSettings(),
        "hf": HfSettings(),
    }
    assert got.budget == BudgetSettings(vram=None, reserve=1 << 30, disk_reserve=10 << 30)
    assert got.control_plane is None
    assert got.policy == Policy()
    assert got.source == ConfigSource(
        "infernet.yaml", hashlib.sha256(text.encode()).hexdigest(), None
    )


def test_contract_full_example() -> None:
    path = CONFIGS / "full.yaml"
    got = desired.load(path, env=NO_ENV)
    assert got.models == (
        ModelSpec(
            "qwen2.5:14b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/qwen2.5:14b",
            "qwen2.5:14b",
            line=3,
        ),
        ModelSpec(
            "llama3.2:3b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/llama3.2:3b",
            "llama3.2:3b",
            quantization="Q4_K_M",
            keep_alive=FOREVER,
            context=8192,
            vram=6 << 30,
            protect=True,
            line=4,
        ),
        ModelSpec(
            "qwen2.5-7b-instruct-q4_k_m.gguf",
            BackendKind.LLAMACPP,
            "qwen2.5-7b-instruct-q4_k_m.gguf",
            "qwen2.5-7b-instruct-q4_k_m.gguf",
            source="hf://Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf",
            line=12,
        ),
        ModelSpec(
            "Qwen/Qwen2.5-7B-Instruct",
            BackendKind.VLLM,
            "Qwen/Qwen2.5-7B-Instruct@main",
            "Qwen/Qwen2.5-7B-Instruct",
            revision="main",
            line=15,
        ),
    )
    assert got.models[1].pinned
    assert got.backend_settings == {
        "ollama": OllamaSettings(
            "http://127.0.0.1:11434", "https://registry.ollama.ai", "~/.ollama/models"
        ),
        "llamacpp": LlamacppSettings("/var/lib/infernet/models", "http://127.0.0.1:8080"),
        "hf": HfSettings("~/.cache/huggingface/hub", "http://127.0.0.1:8000"),
    }
    assert got.budget == BudgetSettings(None, 1 << 30, 10 << 30)
    assert got.control_plane == ControlPlaneSettings(
        url="https://infernet.example",
        key_file="~/.config/infernet/node.key",
        role="provider",
        node_id="gpu-node-17",
        heartbeat_interval=30.0,
        commands="edit",
    )
    assert got.policy == Policy("managed", 3, False, 2, True, "notify")
    assert got.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "path",
    [
        REPO / "infernet.yaml",
        REPO / "examples" / "minimal.yaml",
        REPO / "examples" / "full.yaml",
        REPO / "examples" / "llamacpp.yaml",
    ],
    ids=["infernet.yaml", "examples/minimal", "examples/full", "examples/llamacpp"],
)
def test_shipped_examples_are_valid(path: Path) -> None:
    assert desired.load(path, env=NO_ENV).models


def test_repo_example_has_a_pinned_model() -> None:
    got = desired.load(REPO / "infernet.yaml", env=NO_ENV)
    assert [m.name for m in got.models if not m.pinned] == [
        "qwen2.5:14b",
        "llama3.2:3b",
        "deepseek-coder:6.7b",
    ]
    assert any(m.pinned for m in got.models)


def test_string_entries_take_default_backend() -> None:
    text = "default_backend: llamacpp\nserved_models: [a.gguf, {name: b:1, backend: ollama}]\n"
    got = desired.parse(text, path="f", env=NO_ENV)
    assert [(m.name, m.backend) for m in got.models] == [
        ("a.gguf", BackendKind.LLAMACPP),
        ("b:1", BackendKind.OLLAMA),
    ]


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [
        ("-1", FOREVER),
        ("forever", FOREVER),
        ("0", 0.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("300", 300.0),
        ("'-1m'", FOREVER),
        ("2.5", 2.5),
    ],
)
def test_keep_alive_is_seconds(keep_alive: str, seconds: float) -> None:
    text = f"served_models:\n  - name: a\n    keep_alive: {keep_alive}\n"
    assert desired.parse(text, path="f", env=NO_ENV).models[0].keep_alive == seconds


def test_sizes_and_durations_are_converted() -> None:
    text = (
        "served_models: [{name: a, vram: 1.5GiB}]\n"
        "budget: {vram: 22GiB, reserve: 512MiB, disk_reserve: 50GB}\n"
        "control_plane: {url: 'https://cp:8080', heartbeat_interval: 1m}\n"
    )
    got = desired.parse(text, path="f", env=NO_ENV)
    assert got.models[0].vram == 1_610_612_736
    assert got.budget == BudgetSettings(vram=22 << 30, reserve=512 << 20, disk_reserve=50 * 10**9)
    assert got.control_plane is not None
    assert got.control_plane.heartbeat_interval == 60.0


def test_heartbeat_interval_must_be_positive() -> None:
    text = "served_models: [a]\ncontrol_plane: {url: 'https://cp', heartbeat_interval: 0s}\n"
    with pytest.raises(ValidationError) as caught:
        desired.parse(text, path="f", env=NO_ENV)
    assert str(caught.value) == (
        "f:2:56: control_plane.heartbeat_interval: expected more than 0 seconds"
    )


@pytest.mark.parametrize("url", ["http://cp.example:8080", "http://10.0.0.7", "http://[fd00::1]"])
def test_plain_http_control_plane_off_loopback_is_refused(url: str) -> None:
    """Commands could be injected on the network path, and such a URL was accepted."""
    text = f"served_models: [a]\ncontrol_plane: {{url: '{url}'}}\n"
    with pytest.raises(ValidationError) as caught:
        desired.parse(text, path="f", env=NO_ENV)
    message = str(caught.value)
    assert message.startswith("f:2:") and "control_plane.url: plain http://" in message
    assert "control_plane.insecure: true" in message
    allowed = f"served_models: [a]\ncontrol_plane: {{url: '{url}', insecure: true}}\n"
    got = desired.parse(allowed, path="f", env=NO_ENV).control_plane
    assert got is not None and got.insecure is True


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:9", "https://cp.example"]
)
def test_loopback_or_https_control_plane_needs_no_insecure(url: str) -> None:
    text = f"served_models: [a]\ncontrol_plane: {{url: '{url}'}}\n"
    got = desired.parse(text, path="f", env=NO_ENV).control_plane
    assert got is not None and got.insecure is False


def test_empty_list_allowed_when_policy_says_so() -> None:
    text = "served_models: []\npolicy: {allow_empty: true}\n"
    assert desired.parse(text, path="f", env=NO_ENV).models == ()


def test_exactly_fifty_models_are_fine() -> None:
    text = "served_models: [" + ", ".join(f"m{i}" for i in range(50)) + "]\n"
    assert len(desired.parse(text, path="f", env=NO_ENV).models) == 50


def test_advertise_as_defaults_to_name_and_can_differ() -> None:
    text = "served_models: [a, {name: b, advertise_as: 'team/b'}]\n"
    got = desired.parse(text, path="f", env=NO_ENV)
    assert [m.advertise_as for m in got.models] == ["a", "team/b"]


def test_merge_keys_fill_in_entries() -> None:
    text = (
        "served_models:\n"
        "  - &pinned {name: a, keep_alive: -1, context: 4096}\n"
        "  - <<: *pinned\n"
        "    name: b\n"
        "    context: 8192\n"
    )
    got = desired.parse(text, path="f", env=NO_ENV)
    assert [(m.name, m.keep_alive, m.context, m.line) for m in got.models] == [
        ("a", FOREVER, 4096, 2),
        ("b", FOREVER, 8192, 3),
    ]


# --------------------------------------------------------------------------- defaults from env


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("1.2.3.4", "http://1.2.3.4:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("example.com:56789", "http://example.com:56789"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("https://example.com:56789/path/", "https://example.com:56789/path"),
        ("[::1]", "http://[::1]:11434"),
        ("[::1]:56789/", "http://[::1]:56789"),
    ],
)
def test_ollama_host_normalised_like_the_client(host: str, url: str) -> None:
    assert ollama_settings.ollama_host(host) == url
    got = desired.parse("served_models: [a]\n", path="f", env={"OLLAMA_HOST": host})
    assert ollama_settings.of(got).url == url


def test_ollama_env_defaults_and_file_wins() -> None:
    env = {"OLLAMA_HOST": "gpu:1234", "OLLAMA_MODELS": "/srv/ollama"}
    got = desired.parse("served_models: [a]\n", path="f", env=env)
    assert (ollama_settings.of(got).url, ollama_settings.of(got).models_dir) == (
        "http://gpu:1234",
        "/srv/ollama",
    )
    text = "served_models: [a]\nbackends: {ollama: {url: 'http://x:1/', models_dir: /m}}\n"
    got = desired.parse(text, path="f", env=env)
    assert (ollama_settings.of(got).url, ollama_settings.of(got).models_dir) == ("http://x:1", "/m")


def test_empty_ollama_host_means_default() -> None:
    got = desired.parse("served_models: [a]\n", path="f", env={"OLLAMA_HOST": ""})
    assert ollama_settings.of(got).url == "http://127.0.0.1:11434"


# --------------------------------------------------------------------------- locate


def test_locate_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    explicit, from_env, local = (tmp_path / n for n in ("c.yaml", "e.yaml", "infernet.yaml"))
    for path in (explicit, from_env, local):
        path.write_text("served_models: [a]\n")
    env = {"INFERNET_CONFIG": str(from_env)}
    assert desired.locate(str(explicit), env=env) == explicit
    assert desired.locate(None, env=env) == from_env
    assert desired.locate(None, env={}) == Path("infernet.yaml")


def test_locate_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(desired, "SEARCH_PATH", (Path("infernet.yaml"), tmp_path / "etc.yaml"))
    with pytest.raises(ConfigError) as caught:
        desired.locate(None, env={})
    assert str(caught.value) == (
        f"no infernet.yaml found (looked in: infernet.yaml, {tmp_path / 'etc.yaml'}); "
        "pass -c FILE or set INFERNET_CONFIG"
    )


def test_locate_default_search_path_is_the_contracts() -> None:
    expected = (Path("infernet.yaml"), Path("/etc/infernet/infernet.yaml"))
    assert expected == desired.SEARCH_PATH


def test_locate_missing_explicit_file_says_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml \(given with -c/--config\) does not exist"):
        desired.locate(str(tmp_path / "nope.yaml"), env={})
    with pytest.raises(ConfigError, match=r"nope.yaml \(from \$INFERNET_CONFIG\) does not exist"):
        desired.locate(None, env={"INFERNET_CONFIG": str(tmp_path / "nope.yaml")})


# --------------------------------------------------------------------------- git commit


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@needs_git
@pytest.mark.parametrize("index_version", ["2", "3", "4"])
def test_git_commit_when_tracked_and_clean(tmp_path: Path, index_version: str) -> None:
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "aaa" / "deep").mkdir(parents=True)
    (tmp_path / "aaa" / "deep" / "other.txt").write_text("x\n")
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: [a]\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    _git(tmp_path, "update-index", "--index-version", index_version)
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert desired.load(path, env=NO_ENV).source.git_commit == head
    _git(tmp_path, "pack-refs", "--all")  # the branch now lives in packed-refs only
    assert desired.load(path, env=NO_ENV).source.git_commit == head
    path.write_text("served_models: [b]\n")
    assert desired.load(path, env=NO_ENV).source.git_commit is None


@needs_git
def test_git_commit_none_when_untracked_or_no_repo(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: [a]\n")
    assert desired.load(path, env=NO_ENV).source.git_commit is None
    _git(tmp_path, "init", "-q")
    assert desired.load(path, env=NO_ENV).source.git_commit is None  # no commit yet
    (tmp_path / "other").write_text("x")
    _git(tmp_path, "add", "other")
    _git(tmp_path, "commit", "-q", "-m", "one")
    assert desired.load(path, env=NO_ENV).source.git_commit is None  # untracked


@needs_git
def test_git_commit_in_a_linked_worktree(tmp_path: Path) -> None:
    main = tmp_path / "main"
    main.mkdir()
    _git(main, "init", "-q", "-b", "main")
    (main / "infernet.yaml").write_text("served_models: [a]\n")
    _git(main, "add", ".")
    _git(main, "commit", "-q", "-m", "one")
    _git(main, "worktree", "add", "-q", "-b", "other", str(tmp_path / "wt"))
    head = _git(main, "rev-parse", "HEAD")
    got = desired.load(tmp_path / "wt" / "infernet.yaml", env=NO_ENV)
    assert got.source.git_commit == head


# --------------------------------------------------------------------------- schema


def test_the_shipped_schema_is_what_the_backend_registry_assembles() -> None:
    shipped = json.loads((REPO / "schemas" / "infernet.schema.json").read_text())
    bare = json.loads(json.dumps(shipped))
    bare["$defs"]["backend"]["enum"] = []
    bare["properties"]["backends"]["properties"] = {}
    for family in backends.families():
        for name in family.defs:
            del bare["$defs"][name]
    assert schemacheck.with_backends(bare) == shipped


def test_schema_text_is_the_shipped_file() -> None:
    shipped = (REPO / "schemas" / "infernet.schema.json").read_text(encoding="utf-8")
    assert desired.schema_text() == shipped
    assert desired.schema()["$id"] == "https://infernet.dev/schemas/infernet.schema.json"
    assert desired.schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def _objects(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((where, node))
        for key, value in node.items():
            found += _objects(value, f"{where}/{key}")
    return found


def test_schema_describes_every_property_and_allows_nothing_else() -> None:
    for where, node in _objects(desired.schema()):
        assert node.get("additionalProperties") is False, where
        for name, prop in node["properties"].items():
            assert prop.get("description"), f"{where}/properties/{name}"


def test_schema_is_a_valid_2020_12_schema() -> None:
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(desired.schema())


def test_schema_lists_the_backends_of_the_model() -> None:
    assert desired.schema()["$defs"]["backend"]["enum"] == [k.value for k in backends.kinds()]


def test_import_is_lazy() -> None:
    code = (
        "import sys, reconciler.config.desired, reconciler.config.edit, "
        "reconciler.planning.document; "
        "print(json.dumps(sorted(m for m in ('jsonschema', 'ruamel') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(done.stdout) == []


def _keys_used(value: Any, path: str = "") -> set[str]:
    found = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found |= {f"{path}{key}"} | _keys_used(item, f"{path}{key}.")
    elif isinstance(value, list):
        for item in value:
            found |= _keys_used(item, f"{path}[].")
    return found


def _keys_allowed(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> set[str]:
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    found = set()
    for key, prop in node.get("properties", {}).items():
        found |= {f"{path}{key}"} | _keys_allowed(prop, defs, f"{path}{key}.")
    if "items" in node:
        found |= _keys_allowed(node["items"], defs, f"{path}[].")
    return found


def test_examples_full_shows_every_key() -> None:
    schema = desired.schema()
    used = _keys_used(yaml.safe_load((REPO / "examples" / "full.yaml").read_text()))
    assert _keys_allowed(schema, schema["$defs"]) == used


@pytest.mark.parametrize("quant", ["AWQ", "gptq-int4", "FP8"])
def test_an_engines_quantization_is_a_note_not_a_gguf_name(quant: str) -> None:
    # Engines' repositories carry no quantization infernet reads: their names are not GGUF's.
    text = f"served_models:\n  - {{name: org/m, backend: vllm, quantization: {quant}}}\n"
    assert desired.parse(text, path="f.yaml", env=NO_ENV).models[0].quantization == quant
    gguf = f"served_models:\n  - {{name: m.gguf, backend: llamacpp, quantization: {quant}}}\n"
    with pytest.raises(ValidationError, match="unknown quantization"):
        desired.parse(gguf, path="f.yaml", env=NO_ENV)
