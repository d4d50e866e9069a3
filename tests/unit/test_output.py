"""What a person reads: sizes as ``ollama list`` prints them, the seed's progress line and
header, and the plan's colours (issue 16, items 1, 2 and 9)."""

from __future__ import annotations

import io

import pytest

from reconciler.cli import terminal
from reconciler.cli.progress import ProgressPrinter, header, progress_line
from reconciler.cli.render import human_bytes, vram
from reconciler.events import Event, Kind
from reconciler.model import Action, BackendKind, Op
from reconciler.units import format_size

SIZES = [
    (0, "0 B"),
    (999, "999 B"),
    (1000, "1 KB"),
    (160_000, "160 KB"),
    (45_300_000, "45 MB"),  # a rate: "45 MB/s", as the seed writes it
    (274_302_450, "274 MB"),  # nomic-embed-text in `ollama list`
    (1_900_000_000, "1.9 GB"),
    (4_661_224_676, "4.7 GB"),  # llama3.1:8b in `ollama list`
    (8_988_124_069, "9.0 GB"),  # qwen2.5:14b in `ollama list`
    (7_000_000_000, "7 GB"),
    (42_520_413_916, "42 GB"),  # llama3.1:70b in `ollama list`: whole numbers from ten
    (1_500_000_000_000, "1.5 TB"),
    (-2_000_000, "-2 MB"),
]


@pytest.mark.parametrize(("n", "text"), SIZES)
def test_sizes_read_like_ollama_list(n: int, text: str) -> None:
    assert format_size(n) == text


def test_model_sizes_are_decimal_and_vram_binary() -> None:
    assert human_bytes(8_988_124_069) == "9.0 GB"
    assert vram(10_200_547_328) == "9.5 GiB"
    assert human_bytes(None) == vram(None) == "?"


LINES = [
    # done, total, rate → the seed's line
    (7_200_000_000, 8_100_000_000, 45e6, "██████████████████░░ 89% (7.2 GB / 8.1 GB) 45 MB/s"),
    (0, 8_100_000_000, None, "░░░░░░░░░░░░░░░░░░░░ 0% (0 B / 8.1 GB)"),
    (8_100_000_000, 8_100_000_000, 1.5e6, "████████████████████ 100% (8.1 GB / 8.1 GB) 1.5 MB/s"),
    # nothing says 100% (or a full bar) before the last byte
    (8_099_000_000, 8_100_000_000, 1e6, "███████████████████░ 99% (8.1 GB / 8.1 GB) 1 MB/s"),
]


@pytest.mark.parametrize(("done", "total", "rate", "text"), LINES)
def test_progress_line_is_the_seeds(done: int, total: int, rate: float | None, text: str) -> None:
    assert progress_line(done, total, rate) == text


HEADERS = [
    (
        Action(Op.PULL, "qwen2.5:14b", BackendKind.OLLAMA, "c", "r"),
        "Pulling qwen2.5:14b from Ollama registry...",
    ),
    (
        Action(Op.UPDATE, "qwen2.5:14b", BackendKind.OLLAMA, "c", "r"),
        "Updating qwen2.5:14b from Ollama registry...",
    ),
    (
        Action(
            Op.PULL,
            "q.gguf",
            BackendKind.LLAMACPP,
            "c",
            "r",
            source="https://user:pw@example.com/q.gguf?sig=1",
        ),
        "Pulling q.gguf from https://***@example.com/q.gguf?*** for llama.cpp...",
    ),
    (
        Action(
            Op.PULL,
            "Qwen/Qwen2.5-7B",
            BackendKind.VLLM,
            "c",
            "r",
            source="hf://Qwen/Qwen2.5-7B@main",
        ),
        "Pulling Qwen/Qwen2.5-7B from hf://Qwen/Qwen2.5-7B@main for vLLM...",
    ),
]


@pytest.mark.parametrize(("action", "text"), HEADERS)
def test_header_names_model_source_and_backend(action: Action, text: str) -> None:
    assert header(action) == text


PULL = Action(Op.PULL, "qwen2.5:14b", BackendKind.OLLAMA, "c", "r")


def test_piped_lines_carry_the_bar_and_end_at_100_percent() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(json_lines=False, verbose=True, stream=stream)
    printer(Event(Kind.STARTED, PULL))
    for done in range(0, 9_000_000_001, 500_000_000):  # many events, printed at most every 3 s
        printer(Event(Kind.PROGRESS, PULL, phase="pulling aa", completed=done, total=9_000_000_000))
    printer(Event(Kind.FINISHED, PULL, outcome="ok"))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Pulling qwen2.5:14b from Ollama registry..."
    assert lines[1].startswith("████████████████████ 100% (9 GB / 9 GB)")
    assert lines[-1] == "pull qwen2.5:14b: ok"
    assert len(lines) == 3


PAINTED = [
    ("+  pull    qwen2.5:14b", "bold green"),
    ("-  remove  mistral:7b", "bold red"),
    ("~  update  llama3.2:3b", "bold yellow"),
    ("^  pin     llama3.2:3b", "bold cyan"),
    ("v  unpin   llama3.2:3b", "bold cyan"),
    ("Error: budget", "bold red"),
]


@pytest.mark.parametrize(("line", "style"), PAINTED)
def test_plan_symbols_take_terraforms_colours(line: str, style: str) -> None:
    spans = terminal.paint(line).spans
    assert spans and spans[0].start == 0 and str(spans[0].style) == style


@pytest.mark.parametrize("line", ["VRAM [####....] 20%", "   ACTION  MODEL", "vicuna-line"])
def test_other_lines_stay_uncoloured(line: str) -> None:
    assert terminal.paint(line).spans == []
