"""Comment- and layout-preserving edits of infernet.yaml (reconciler.config.edit).

The cases are data (``configs/edits/cases.yaml``); the tests below them cover what a table
cannot: line endings, file modes, symlinks and a write that fails half-way.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.config import desired
from reconciler.config import edit as configedit
from reconciler.errors import ConfigError
from reconciler.model import FOREVER, BackendKind

CASES = yaml.safe_load((Path(__file__).parent / "configs" / "edits" / "cases.yaml").read_text())


def _call(op: str, path: Path, args: list[Any]) -> bool:
    if op == "add":
        return configedit.add_model(path, args[0])
    if op == "remove":
        backend = BackendKind(args[1]) if args[1] else None
        return configedit.remove_model(path, args[0], backend)
    return configedit.set_keep_alive(path, args[0], args[1])


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_edit(case: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text(case["before"], encoding="utf-8")
    if "error" in case:
        with pytest.raises(ConfigError) as caught:
            _call(case["op"], path, case["args"])
        assert case["error"].format(path=path) in str(caught.value)
        assert path.read_text(encoding="utf-8") == case["before"]
        assert [p.name for p in tmp_path.iterdir()] == ["infernet.yaml"]
        return
    assert _call(case["op"], path, case["args"]) is case.get("returns", True)
    assert path.read_text(encoding="utf-8") == case["after"]
    desired.load(path)  # and the result is valid


def test_missing_file_is_created_by_add(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    assert configedit.add_model(path, "qwen2.5:14b")
    assert path.read_text() == "served_models:\n  - qwen2.5:14b\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~_umask()
    assert not configedit.remove_model(tmp_path / "other.yaml", "x", None)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: [a]\n")
    path.chmod(0o640)
    assert configedit.add_model(path, "b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_symlink_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "repo" / "infernet.yaml"
    real.parent.mkdir()
    real.write_text("served_models: [a]\n")
    link = tmp_path / "infernet.yaml"
    link.symlink_to(real)
    assert configedit.add_model(link, "b")
    assert link.is_symlink()
    assert real.read_text() == "served_models: [a, b]\n"


def test_crlf_line_endings_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_bytes(b"served_models:\r\n  - a   # first\r\n")
    assert configedit.set_keep_alive(path, "a", FOREVER)
    assert configedit.add_model(path, "b")
    assert path.read_bytes() == (
        b"served_models:\r\n  - name: a   # first\r\n    keep_alive: forever\r\n  - b\r\n"
    )


def test_byte_order_mark_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_bytes(b"\xef\xbb\xbfserved_models: [a]\n")
    assert configedit.add_model(path, "b")
    assert path.read_bytes() == b"\xef\xbb\xbfserved_models: [a, b]\n"


def test_no_newline_at_end(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models:\n  - a")
    assert configedit.set_keep_alive(path, "a", "10m")
    assert path.read_text() == "served_models:\n  - name: a\n    keep_alive: 10m\n"
    path.write_text("served_models:\n  - a")
    assert configedit.add_model(path, "b")
    assert path.read_text() == "served_models:\n  - a\n  - b\n"


def test_remove_every_match_and_only_on_the_backend_asked(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text(
        "served_models:\n"
        "  - {name: Org/M, backend: vllm}\n"
        "  - {name: Org/M, backend: sglang, advertise_as: m2}\n"
        "  - keep\n"
    )
    assert configedit.remove_model(path, "Org/M", BackendKind.SGLANG)
    assert path.read_text() == "served_models:\n  - {name: Org/M, backend: vllm}\n  - keep\n"
    path.write_text(
        "served_models:\n"
        "  - {name: Org/M, backend: vllm}\n"
        "  - {name: Org/M, backend: sglang, advertise_as: m2}\n"
        "  - keep\n"
    )
    assert configedit.remove_model(path, "Org/M", None)
    assert path.read_text() == "served_models:\n  - keep\n"


def test_a_failed_write_leaves_the_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: [a]\n")

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        configedit.add_model(path, "b")
    assert path.read_text() == "served_models: [a]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["infernet.yaml"]


def test_a_splice_that_changes_meaning_is_refused(tmp_path: Path) -> None:
    # y merges x's settings: changing x's keep_alive text would change y's too. The check that
    # the new file means "old file + this one change" catches it and nothing is written.
    path = tmp_path / "infernet.yaml"
    text = "served_models:\n  - &x {name: x, keep_alive: 5m}\n  - <<: *x\n    name: y\n"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        configedit.set_keep_alive(path, "x", -1)
    assert str(caught.value) == (
        f"cannot set keep_alive of x in {path} automatically (its layout is unusual, e.g. YAML "
        "aliases in served_models); edit it by hand"
    )
    assert path.read_text() == text
    assert configedit.set_keep_alive(path, "y", -1)  # y's own mapping is fine to extend
    assert path.read_text() == text + "    keep_alive: -1\n"


def test_malformed_file_is_refused_with_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: [a\n")
    with pytest.raises(ConfigError, match=r"infernet.yaml:1:18: the file ends unexpectedly"):
        configedit.add_model(path, "b")
    assert path.read_text() == "served_models: [a\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (" [Org/M, o/keep, {name: Org/M, backend: sglang, advertise_as: b}]", " [o/keep]"),
        (" [o/keep, Org/M, {name: Org/M, backend: sglang, advertise_as: b}]", " [o/keep]"),
        (" [Org/M, {name: Org/M, backend: sglang, advertise_as: b}, o/keep]", " [o/keep]"),
        (" [Org/M, {name: Org/M, backend: sglang, advertise_as: b}]", " []"),
        ("\n  - Org/M\n  - name: Org/M\n    backend: sglang\n    advertise_as: b\n", " []\n"),
    ],
)
def test_remove_several_entries_at_once(tmp_path: Path, before: str, after: str) -> None:
    settings = "default_backend: vllm\npolicy: {allow_empty: true}\n"
    path = tmp_path / "infernet.yaml"
    path.write_text(f"{settings}served_models:{before}")
    assert configedit.remove_model(path, "Org/M", None)
    assert path.read_text() == f"{settings}served_models:{after}"


_POOL = ["qwen2.5:14b", "llama3.2:3b", "deepseek-coder:6.7b", "phi3:mini", "mistral", "gemma2:2b"]


@settings(max_examples=60, deadline=None)
@given(
    start=st.lists(st.sampled_from(_POOL), min_size=1, max_size=4, unique=True),
    flow=st.booleans(),
    quoted=st.booleans(),
    steps=st.lists(
        st.tuples(st.sampled_from(["add", "remove", "pin"]), st.sampled_from(_POOL)), max_size=6
    ),
)
def test_any_sequence_of_edits_means_what_it_says(
    start: list[str], flow: bool, quoted: bool, steps: list[tuple[str, str]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "infernet.yaml"
        shown = [f'"{n}"' if quoted else n for n in start]
        body = f" [{', '.join(shown)}]" if flow else "".join(f"\n  - {n}  # c" for n in shown)
        path.write_text(f"# models\nserved_models:{body}\npolicy: {{allow_empty: true}}\n")
        model: dict[str, float | None] = dict.fromkeys(start)  # name -> keep_alive
        for op, name in steps:
            if op == "add":
                assert configedit.add_model(path, name) is (name not in model)
                model.setdefault(name, None)
            elif op == "remove":
                assert configedit.remove_model(path, name, None) is (name in model)
                model.pop(name, None)
            else:
                changed = name in model and model[name] != FOREVER
                assert configedit.set_keep_alive(path, name, FOREVER) is changed
                if name in model:
                    model[name] = FOREVER
            got = desired.load(path)
            assert {m.name: m.keep_alive for m in got.models} == model
            assert path.read_text().startswith("# models\n")
