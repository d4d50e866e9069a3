"""The pure parts of the engine supervisor: file names, command templates, exit codes."""

from __future__ import annotations

import shlex
import sys

import pytest

from reconciler.backends.hf.engines.launch import format_command
from reconciler.backends.hf.engines.records import EngineSpec, describe_exit, safe_name
from reconciler.backends.hf.settings import ENGINE_COMMANDS
from reconciler.errors import BackendError


def spec(command: str, **kw: object) -> EngineSpec:
    fields: dict[str, object] = {
        "key": "vllm:Qwen/Qwen2.5-7B-Instruct@main",
        "kind": "vllm",
        "command": command,
        "path": "/models/Qwen 7B",
        "served_name": "qwen2.5-7b",
        "fraction": 0.9,
    }
    fields.update(kw)
    return EngineSpec(**fields)  # type: ignore[arg-type]


def test_safe_name_is_a_plain_file_name_and_keeps_keys_apart() -> None:
    name = safe_name("vllm:Qwen/Qwen2.5-7B-Instruct@main")
    assert name.startswith("vllm_Qwen_Qwen2.5-7B-Instruct_main-")
    assert all(c.isalnum() or c in "._-" for c in name)
    assert safe_name("vllm:a/b@main") != safe_name("vllm:a_b@main")
    assert safe_name("../../etc") != ".." and "/" not in safe_name("../../etc")
    assert len(safe_name("x" * 500)) < 100


@pytest.mark.parametrize(
    ("kind", "flags"),
    [
        ("vllm", ["vllm", "serve", "/models/Qwen 7B", "--gpu-memory-utilization"]),
        (
            "sglang",
            ["python3", "-m", "sglang.launch_server", "--model-path", "--mem-fraction-static"],
        ),
        ("max", ["max", "serve", "--model-path", "--device-memory-utilization"]),
    ],
)
def test_default_commands_fill_every_engine_flag(kind: str, flags: list[str]) -> None:
    argv = format_command(spec(ENGINE_COMMANDS[kind], kind=kind), 8001)
    assert all(flag in argv for flag in flags)
    assert argv[argv.index("--served-model-name") + 1] == "qwen2.5-7b"
    assert argv[argv.index("--port") + 1] == "8001"
    assert "/models/Qwen 7B" in argv  # a path with a space stays one argument
    assert argv[-1] == "0.9"


def test_template_placeholders_and_quoting() -> None:
    argv = format_command(
        spec(
            "{python} -m x --host {host} --alias {served_name} --f {fraction:.2f} '{{literal}}'",
            fraction=1 / 3,
        ),
        9000,
        host="0.0.0.0",
    )
    assert argv == [
        sys.executable,
        "-m",
        "x",
        "--host",
        "0.0.0.0",
        "--alias",
        "qwen2.5-7b",
        "--f",
        "0.33",
        "{literal}",
    ]
    assert format_command(spec("e --f {fraction}", fraction=0.1 + 0.2), 1)[-1] == "0.3"
    assert shlex.join(format_command(spec("e {path}"), 1)) == "e '/models/Qwen 7B'"


@pytest.mark.parametrize(
    ("command", "match"),
    [
        ("vllm serve {model}", r"unknown placeholder \('model'\); known: \{path\}"),
        ("vllm serve {0}", "unknown placeholder"),
        ("vllm serve 'unclosed", "can't be split"),
        ("", "is empty"),
    ],
)
def test_bad_templates_are_one_line_errors(command: str, match: str) -> None:
    with pytest.raises(BackendError, match=match) as err:
        format_command(spec(command), 1)
    assert "\n" not in str(err.value) and err.value.model == "qwen2.5-7b"


def test_describe_exit() -> None:
    assert describe_exit(None) == "exit code unknown"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(137) == "exit code 137: killed by SIGKILL, out of memory?"
    assert describe_exit(143) == "exit code 143: killed by SIGTERM"
    assert describe_exit(200) == "exit code 200"


def test_every_default_engine_template_binds_loopback() -> None:
    # `max serve` listens on 0.0.0.0 unless told (the real MAX 26.7.0); vLLM and SGLang too.
    for kind, command in ENGINE_COMMANDS.items():
        assert "--host 127.0.0.1" in command, kind
