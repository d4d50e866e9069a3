"""The tiny-GGUF generator: the reference recipe, read back by ``gguf`` and loaded by llama.cpp."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType

from tests.servers import llamabuild
from tests.servers.llamacpp_harness import Router, start_router
from tests.servers.tinygguf import corrupt_gguf, param_count, write_tiny_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]
# The three models of reference §2, with the sizes measured there.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny-a": {"hidden": 64, "layers": 2},
    "tiny-b": {"hidden": 128, "layers": 2, "ff": 256, "f16": True},
    "tiny-c": {"hidden": 96, "layers": 4, "ff": 192, "heads": 6, "kv_heads": 3},
}
SIZES = {"tiny-a": 370_176, "tiny-b": 666_368, "tiny-c": 1_438_752}


def fields(path: Path) -> dict[str, Any]:
    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sizes_match_the_reference(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    written = write_tiny_gguf(path, name=name, **VARIANTS[name])

    assert written == path.stat().st_size == SIZES[name]


def test_metadata_tokenizer_and_tensors(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, name="tiny", hidden=128, ff=256, f16=True, context=512)

    meta = fields(path)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny"
    assert meta["general.file_type"] == 1
    assert meta["llama.context_length"] == 512
    assert meta["llama.embedding_length"] == 128
    assert meta["llama.block_count"] == 2
    assert meta["llama.feed_forward_length"] == 256
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["tokenizer.ggml.model"] == "llama"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 259
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokens[-1] == "<0xFF>"
    assert types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # tied to token_embd
    assert len(tensors) == 2 + 9 * 2
    assert sum(int(t.n_elements) for t in tensors.values()) == param_count(hidden=128, ff=256)
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    # numpy (rows, cols) is GGUF ne [cols, rows]; K/V have kv_heads * head_dim rows.
    assert list(tensors["blk.1.attn_k.weight"].shape) == [128, 64]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [256, 128]


def test_seed_and_file_type(tmp_path: Path) -> None:
    a1, a2, b = tmp_path / "a1.gguf", tmp_path / "a2.gguf", tmp_path / "b.gguf"
    write_tiny_gguf(a1, name="a")
    write_tiny_gguf(a2, name="a")
    write_tiny_gguf(b, name="a", seed=1, file_type=15)

    assert a1.read_bytes() == a2.read_bytes()
    assert a1.read_bytes() != b.read_bytes()
    assert fields(b)["general.file_type"] == 15  # claims Q4_K_M; the tensors stay F32


def test_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: GGUFWriter, **_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_tiny_gguf(tmp_path / "x.gguf", name="x")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="multiple of heads"):
        write_tiny_gguf(tmp_path / "x.gguf", name="x", hidden=65)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_files_keep_the_magic(tmp_path: Path) -> None:
    garbage, truncated = tmp_path / "garbage.gguf", tmp_path / "truncated.gguf"
    assert corrupt_gguf(garbage, size=1000) == 1000
    assert corrupt_gguf(truncated, kind="truncated") == SIZES["tiny-a"] // 2

    for path in (garbage, truncated):
        assert path.read_bytes()[:4] == b"GGUF"
        with pytest.raises((ValueError, IndexError)):
            GGUFReader(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gguf", "truncated.gguf"]

    source = tmp_path / "src.gguf"
    write_tiny_gguf(source, name="src", layers=3)
    half = corrupt_gguf(tmp_path / "half.gguf", kind="truncated", source=source)
    assert half == source.stat().st_size // 2


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "tests.servers.tinygguf", str(out), "--hidden", "128", "--f16"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == [str(out), str(out.stat().st_size)]
    assert fields(out)["general.name"] == "cli"

    bad = subprocess.run(
        [sys.executable, "-m", "tests.servers.tinygguf", str(tmp_path / "b.gguf"), "--heads", "5"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "multiple of heads" in bad.stderr


# in the real llama.cpp ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    binary = llamabuild.build()
    tmp = tmp_path_factory.mktemp("tinygguf-router")
    models = tmp / "models"
    models.mkdir()
    for name, spec in VARIANTS.items():
        write_tiny_gguf(models / f"{name}.gguf", name=name, **spec)
    write_tiny_gguf(models / "claims-q4.gguf", name="claims-q4", file_type=15, context=128)
    with start_router(tmp / "router", models, binary=binary, models_max=0) as r:
        yield r


@pytest.mark.parametrize(
    ("name", "ftype"),
    [("tiny-a", "all F32"), ("tiny-b", "F16"), ("tiny-c", "all F32"), ("claims-q4", None)],
)
def test_llama_cpp_loads_each_variant(router: Router, name: str, ftype: str | None) -> None:
    spec = VARIANTS.get(name, {})
    dims = {k: v for k, v in spec.items() if k != "f16"}

    assert router.load(name).status_code == 200
    meta = router.wait_status(name, "loaded")["meta"]

    assert meta["n_params"] == param_count(**dims)
    assert meta["n_vocab"] == 259
    if ftype is not None:
        assert meta["ftype"] == ftype
    else:
        assert meta["ftype"] == "Q4_K - Medium"  # llama.cpp believes general.file_type
        assert meta["n_ctx_train"] == 128


def test_generation_is_deterministic_at_temperature_zero(router: Router) -> None:
    def complete() -> dict[str, Any]:
        resp = router.request(
            "POST",
            "/completion",
            json={
                "model": "tiny-a",
                "prompt": "Hi\n",
                "n_predict": 6,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result

    first, second = complete(), complete()
    assert first["tokens_predicted"] == 6
    assert first["content"] == second["content"]
    # Byte tokens detokenize to bytes (token types), not to "<0x0A>" text.
    assert "<0x" not in first["content"]
