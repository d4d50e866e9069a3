"""The GGUF metadata parser, on prefixes built by a tiny writer here."""

from __future__ import annotations

import struct
from typing import Any

import httpx
import pytest

from reconciler.backends.gguf.header import (
    GGML_TYPES,
    MAX_ARRAY_DEPTH,
    MERGE_COUNT,
    TOKEN_COUNT,
    NotGGUF,
    has_essentials,
    parse_header,
)
from reconciler.backends.ollama import registry
from reconciler.backends.ollama.names import parse_ollama
from reconciler.backends.ollama.parse import apply_gguf_header
from reconciler.model import ModelFacts

FMT = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _val(kind: int, value: Any) -> bytes:
    if kind == 8:
        return _s(value)
    if kind == 9:
        elem, items = value
        return struct.pack("<IQ", elem, len(items)) + b"".join(_val(elem, i) for i in items)
    return struct.pack(FMT[kind], value)


def gguf(pairs: list[tuple[str, int, Any]], *, version: int = 3, tensors: int = 5) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, tensors, len(pairs))
    for key, kind, value in pairs:
        out += _s(key) + struct.pack("<I", kind) + _val(kind, value)
    return out + b"\xff" * 64  # tensor infos follow; never read


LLAMA: list[tuple[str, int, Any]] = [
    ("general.architecture", 8, "llama"),
    ("general.name", 8, "Tiny"),
    ("general.parameter_count", 10, 1_235_814_432),
    ("general.file_type", 4, 15),
    ("llama.block_count", 4, 16),
    ("llama.context_length", 4, 131072),
    ("llama.embedding_length", 4, 2048),
    ("llama.attention.head_count", 4, 32),
    ("llama.attention.head_count_kv", 4, 8),
    ("llama.attention.key_length", 4, 64),
    ("llama.attention.value_length", 4, 64),
    ("llama.rope.freq_base", 6, 500000.0),
    ("tokenizer.ggml.tokens", 9, (8, [f"tok{i}" for i in range(5000)])),
    ("tokenizer.ggml.scores", 9, (6, [0.5] * 5000)),
    ("tokenizer.ggml.add_bos_token", 7, True),
    ("tokenizer.ggml.bos_token_id", 5, -1),
]


def test_v3_keeps_wanted_keys_and_walks_the_rest() -> None:
    header = parse_header(gguf(LLAMA))
    assert header.complete and header.version == 3 and header.kv_count == len(LLAMA)
    assert header.metadata == {
        "general.architecture": "llama",
        "general.parameter_count": 1_235_814_432,
        "general.file_type": 15,
        "llama.block_count": 16,
        "llama.context_length": 131072,
        "llama.embedding_length": 2048,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.attention.key_length": 64,
        "llama.attention.value_length": 64,
        TOKEN_COUNT: 5000,
        MERGE_COUNT: 0,
    }
    assert has_essentials(header.metadata)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (0, 200),
        (1, -5),
        (2, 60000),
        (3, -300),
        (4, 7),
        (5, -7),
        (6, 1.5),
        (7, False),
        (10, 2**40),
        (11, -(2**40)),
        (12, 0.25),
        (8, "hello"),
        (9, (4, [1, 2, 3])),
        (9, (8, ["a", "bc"])),
        (9, (9, [(5, [1, -1]), (5, [])])),
    ],
)
def test_every_value_type_round_trips(kind: int, value: Any) -> None:
    data = gguf([("phi.block_count", kind, value), ("general.architecture", 8, "phi")])
    header = parse_header(data, wanted=lambda _key: True)
    assert header.complete
    expected = value
    if kind == 9:
        elem, items = value
        expected = [list(i[1]) for i in items] if elem == 9 else list(items)
    assert header.metadata["phi.block_count"] == expected
    assert header.metadata["general.architecture"] == "phi"


def test_version_2_and_unwanted_arrays_are_skipped() -> None:
    data = gguf([("x.tokens", 9, (8, ["a"] * 3)), ("x.block_count", 4, 4)], version=2)
    header = parse_header(data)
    assert header.complete and header.metadata == {"x.block_count": 4}


def test_a_wanted_array_of_per_layer_values_is_kept() -> None:
    data = gguf([("gemma.attention.head_count_kv", 9, (5, [8, 8, 4]))])
    assert parse_header(data).metadata == {"gemma.attention.head_count_kv": [8, 8, 4]}


def test_a_prefix_cut_in_the_middle_gives_what_was_read() -> None:
    data = gguf(LLAMA)
    cut = data.index(b"tokenizer.ggml.tokens") + 200  # inside the token array
    header = parse_header(data[:cut])
    assert not header.complete
    assert header.metadata["llama.block_count"] == 16
    assert has_essentials(header.metadata)
    early = parse_header(data[: data.index(b"llama.block_count") + 3])
    assert not early.complete and early.metadata == {
        "general.architecture": "llama",
        "general.parameter_count": 1_235_814_432,
        "general.file_type": 15,
    }
    assert not has_essentials(early.metadata)
    assert parse_header(data[:10]).metadata == {}
    assert not parse_header(b"").complete


def test_garbage_is_not_gguf() -> None:
    with pytest.raises(NotGGUF):
        parse_header(b"<html>captive portal</html>")
    with pytest.raises(NotGGUF):
        parse_header(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(NotGGUF):  # unknown value type
        parse_header(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("k") + struct.pack("<I", 99))


def nested_arrays(depth: int) -> bytes:
    """A value ``depth`` arrays deep: each array holds one array, the innermost none."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)


def deep_gguf(depth: int) -> bytes:
    pair = _s("general.deep") + struct.pack("<I", 9) + nested_arrays(depth)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + pair


@pytest.mark.parametrize("depth", [MAX_ARRAY_DEPTH + 1, 5000])
def test_arrays_nested_too_deep_are_not_gguf_and_never_exhaust_the_stack(depth: int) -> None:
    # 5000 levels used to raise RecursionError, which crashed plan and watch
    for wanted in (None, lambda _key: True):
        with pytest.raises(NotGGUF, match="nested"):
            parse_header(deep_gguf(depth), **({"wanted": wanted} if wanted else {}))
    assert parse_header(deep_gguf(MAX_ARRAY_DEPTH), wanted=lambda _key: True).complete


def test_the_ggml_type_table_is_ggufs() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    theirs = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}
    assert theirs == GGML_TYPES


def test_a_duplicate_key_is_not_gguf() -> None:
    with pytest.raises(NotGGUF, match="duplicate key"):
        parse_header(gguf([("x.block_count", 4, 4), ("x.block_count", 4, 5)]))


def test_the_vocabulary_size_is_the_token_lists_length_even_cut_short() -> None:
    data = gguf(LLAMA)
    cut = data.index(b"tokenizer.ggml.tokens") + 200  # inside the token array
    assert parse_header(data[:cut]).metadata[TOKEN_COUNT] == 5000
    # the length itself cut off: unknown, not wrong
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 6
    assert TOKEN_COUNT not in parse_header(data[:at]).metadata


def _client(blob: bytes, seen: list[str | None]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if "/blobs/" in request.url.path:
            return httpx.Response(307, headers={"Location": "http://cdn.test/obj"})
        seen.append(request.headers.get("Range"))
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        return httpx.Response(206, content=blob[int(first) : int(last) + 1])

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_fetch_doubles_the_range_until_the_keys_are_in() -> None:
    blob = gguf([*LLAMA[:4], ("general.padding", 8, "x" * 3000), *LLAMA[4:]])
    layer = registry.Layer(registry.WEIGHTS_MEDIA, "sha256:" + "ab" * 32, len(blob))
    seen: list[str | None] = []
    meta = registry.fetch_gguf_header(
        _client(blob, seen), parse_ollama("llama3.2:1b"), "http://reg.test", layer, first=1024
    )
    assert meta["llama.block_count"] == 16
    assert seen == ["bytes=0-1023", "bytes=0-2047", "bytes=0-4095"]
    seen.clear()
    meta = registry.fetch_gguf_header(
        _client(blob, seen),
        parse_ollama("llama3.2:1b"),
        "http://reg.test",
        layer,
        first=1024,
        limit=2048,
    )
    assert "llama.block_count" not in meta and meta["general.architecture"] == "llama"
    assert seen == ["bytes=0-1023", "bytes=0-2047"]


def test_header_keys_complete_the_registry_facts() -> None:
    facts = ModelFacts(digest="d", size=10, weights_bytes=9, quantization="Q4_K_M")
    header = parse_header(gguf(LLAMA)).metadata
    out = apply_gguf_header(facts, header)
    assert (out.block_count, out.head_count, out.head_count_kv, out.context_length) == (
        16,
        32,
        8,
        131072,
    )
    assert (out.embedding_length, out.key_length, out.value_length) == (2048, 64, 64)
    assert out.parameter_count == 1_235_814_432 and out.quantization == "Q4_K_M"
    assert apply_gguf_header(facts, {}) is facts


def test_fetch_stops_reading_when_the_server_ignores_range_and_gives_up_on_errors() -> None:
    blob = gguf(LLAMA) + b"\0" * 2_000_000
    layer = registry.Layer(registry.WEIGHTS_MEDIA, "sha256:" + "cd" * 32, len(blob))
    sent: list[int] = []

    def chunks() -> Any:
        for i in range(0, len(blob), 65536):
            sent.append(i)
            yield blob[i : i + 65536]

    def whole(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    client = httpx.Client(transport=httpx.MockTransport(whole))
    name = parse_ollama("llama3.2:1b")
    meta = registry.fetch_gguf_header(client, name, "http://reg.test", layer, first=65536)
    assert meta["llama.attention.head_count_kv"] == 8
    assert len(sent) <= 2  # not the whole 2 MB

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, text="AccessDenied")

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    assert registry.fetch_gguf_header(client, name, "http://reg.test", layer) == {}
