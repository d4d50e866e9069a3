"""The fake registry's catalogue: model specs, deterministic blobs and registry manifests.

Each catalogue entry becomes a registry manifest with real SHA-256 digests. The weights blob
starts with a genuine GGUF header carrying the model's metadata (so the Ollama stand-in reads
``model_info`` and capabilities back from its own store, as Ollama does) and is padded with
SHAKE-256 output of the entry's seed. Aliases serve the very same manifest bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers.ollama_names import Name, human_number, parse_name

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."

FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
_FILE_TYPE_NUMBERS = {text: number for number, text in FILE_TYPES.items()}

# GGUF value types used here.
_GGUF_UINT32, _GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT64 = 4, 7, 8, 9, 10


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(v: Any) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return _GGUF_BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return _GGUF_UINT32, struct.pack("<I", v)
        return _GGUF_UINT64, struct.pack("<Q", v)
    if isinstance(v, str):
        return _GGUF_STRING, _gguf_string(v)
    items = list(v)
    return _GGUF_ARRAY, struct.pack("<IQ", _GGUF_STRING, len(items)) + b"".join(
        _gguf_string(str(item)) for item in items
    )


def gguf_header(kv: dict[str, Any]) -> bytes:
    """A GGUF v3 header with no tensors and the given metadata."""
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(kv))]
    for key, value in kv.items():
        kind, payload = _gguf_value(value)
        out += [_gguf_string(key), struct.pack("<I", kind), payload]
    return b"".join(out)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_kv(path: Path) -> dict[str, Any]:
    """The metadata of a GGUF file (empty when the file is not GGUF)."""
    with path.open("rb") as f:
        data = f.read(1 << 20)
    if data[:4] != b"GGUF":
        return {}
    pos = 24
    count = struct.unpack_from("<Q", data, 16)[0]

    def read(kind: int) -> Any:
        nonlocal pos
        if kind == _GGUF_STRING:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
            return data[pos - n : pos].decode("utf-8", "replace")
        if kind == _GGUF_ARRAY:
            item_kind, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [read(item_kind) for _ in range(n)]
        fmt = _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    kv: dict[str, Any] = {}
    try:
        for _ in range(count):
            key = read(_GGUF_STRING)
            (kind,) = struct.unpack_from("<I", data, pos)
            pos += 4
            kv[key] = read(kind)
    except (struct.error, KeyError):
        pass
    return kv


def _filler(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size) if size > 0 else b""


def _sized_text(text: str, size: int | None, seed: str) -> bytes:
    raw = text.encode()
    if size is None or size <= len(raw):
        return raw
    words = _filler(seed, size).hex()
    pad = "\n" + " ".join(words[i : i + 7] for i in range(0, len(words), 8))
    return (raw + pad.encode())[:size]


@dataclass
class Entry:
    """One catalogue model; ``generation`` changes its weights when bumped upstream."""

    name: Name
    spec: dict[str, Any]
    aliases: list[Name] = field(default_factory=list)
    generation: int = 0
    removed: bool = False


@dataclass
class Built:
    manifest: bytes
    digest: str
    weights_digest: str


def _template_for(caps: list[str]) -> str:
    parts = ["{{- if .System }}<|system|>{{ .System }}<|end|>{{ end }}"]
    if "tools" in caps:
        parts.append("{{- if .Tools }}<|tools|>{{ range .Tools }}{{ . }}{{ end }}{{ end }}")
    if "thinking" in caps:
        parts.append("{{- if .Think }}<think>{{ end }}")
    parts.append("<|user|>{{ .Prompt }}<|end|>")
    if "insert" in caps:
        parts.append("{{- if .Suffix }}<|suffix|>{{ .Suffix }}{{ end }}")
    parts.append("<|assistant|>{{ .Response }}<|end|>")
    return "\n".join(parts)


class Catalogue:
    """Registry-side model store; thread-safe; keyed by (namespace, model, tag) lower-case."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, str], Entry] = {}
        self._built: dict[int, tuple[int, Built]] = {}
        self._blobs: dict[str, bytes] = {}
        for text, spec in models.items():
            self.add(text, spec)

    @classmethod
    def from_file(cls, path: Path) -> Catalogue:
        data = json.loads(path.read_text())
        return cls(dict(data.get("models", {})))

    def add(self, text: str, spec: dict[str, Any]) -> Entry:
        name = parse_name(text)
        if not name.is_valid():
            raise ValueError(f"invalid catalogue name {text!r}")
        aliases = [parse_name(a) for a in spec.get("aliases") or []]
        entry = Entry(name=name, spec=dict(spec), aliases=aliases)
        with self._lock:
            for n in [name, *aliases]:
                self._entries[n.repo_key()] = entry
        return entry

    def resolve(self, namespace: str, model: str, tag: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get((namespace.lower(), model.lower(), tag.lower()))
        return None if entry is None or entry.removed else entry

    def resolve_name(self, text: str) -> Entry | None:
        n = parse_name(text)
        return self.resolve(n.namespace, n.model, n.tag)

    def bump(self, entry: Entry) -> Built:
        with self._lock:
            entry.generation += 1
        return self.build(entry)

    def blob(self, digest: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(digest)

    def build(self, entry: Entry) -> Built:
        """The registry manifest of an entry (cached per generation)."""
        with self._lock:
            cached = self._built.get(id(entry))
            if cached and cached[0] == entry.generation:
                return cached[1]
            built = self._build(entry)
            self._built[id(entry)] = (entry.generation, built)
            return built

    def _put(self, media: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._blobs[digest] = data
        return {"mediaType": media, "digest": digest, "size": len(data)}

    def _build(self, entry: Entry) -> Built:
        spec = entry.spec
        seed = f"{entry.name.full().lower()}#{entry.generation}"
        weights_seed = f"{spec.get('weights_seed', entry.name.full().lower())}#{entry.generation}"
        caps = list(spec.get("capabilities") or ["completion"])
        file_type, quant = _file_type(spec)
        param_count = int(spec.get("parameter_count", 1_235_814_432))
        params_text = str(spec.get("params") or human_number(param_count))
        family = str(spec.get("family", "llama"))
        kv = self._gguf_kv(entry, family, param_count, file_type, caps)
        header = gguf_header(kv)
        size = max(int(spec.get("weights_size", 102_400)), len(header))
        weights = header + _filler(weights_seed, size - len(header))
        layers = [self._put(MEDIA_PREFIX + "model", weights)]
        if "vision" in caps:
            projector = gguf_header({"general.architecture": "clip"})
            layers.append(self._put(MEDIA_PREFIX + "projector", projector + _filler(seed, 4096)))
        license_text = str(spec.get("license", f"{params_text} {family} model license\n"))
        layers.append(
            self._put(MEDIA_PREFIX + "license", _sized_text(license_text, 320, seed + "L"))
        )
        if "embedding" not in caps:
            template = str(spec.get("template", _template_for(caps)))
            layers.append(self._put(MEDIA_PREFIX + "template", template.encode()))
        if spec.get("system"):
            layers.append(self._put(MEDIA_PREFIX + "system", str(spec["system"]).encode()))
        params = spec.get("params_json", {"stop": ["<|end|>", "<|user|>"], "temperature": 0.7})
        if params:
            layers.append(
                self._put(
                    MEDIA_PREFIX + "params", json.dumps(params, separators=(",", ":")).encode()
                )
            )
        config: dict[str, Any] = {
            "model_format": "gguf",
            "model_family": family,
            "model_families": [family],
            "model_type": params_text,
            "file_type": quant,
        }
        if spec.get("requires"):
            config["requires"] = str(spec["requires"])
        config |= {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [la["digest"] for la in layers]},
        }
        config_desc = self._put(MEDIA_CONFIG, json.dumps(config, separators=(",", ":")).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc,
            "layers": layers,
        }
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        return Built(raw, hashlib.sha256(raw).hexdigest(), layers[0]["digest"])

    @staticmethod
    def _gguf_kv(
        entry: Entry, family: str, param_count: int, file_type: int, caps: list[str]
    ) -> dict[str, Any]:
        spec = entry.spec
        embedding = "embedding" in caps
        kv: dict[str, Any] = {
            "general.architecture": family,
            "general.name": str(spec.get("weights_seed", entry.name.model)),
            "general.type": "model",
            "general.parameter_count": param_count,
            "general.file_type": file_type,
            "general.quantization_version": 2,
            f"{family}.block_count": int(spec.get("block_count", 16)),
            f"{family}.context_length": int(spec.get("context_length", 512 if embedding else 8192)),
            f"{family}.embedding_length": int(spec.get("embedding_length", 2048)),
            f"{family}.attention.head_count": int(spec.get("head_count", 32)),
            f"{family}.attention.head_count_kv": int(spec.get("head_count_kv", 8)),
        }
        if embedding:
            kv[f"{family}.pooling_type"] = 1
        kv["tokenizer.ggml.model"] = "bert" if embedding else "gpt2"
        kv["tokenizer.ggml.tokens"] = ["<s>", "</s>", "<unk>", "a", "b", "c", "d", "e"]
        return kv


def _file_type(spec: dict[str, Any]) -> tuple[int, str]:
    """(GGUF file_type number, quantization text) from either field."""
    if "file_type" in spec:
        number = int(spec["file_type"])
        return number, str(spec.get("quantization") or FILE_TYPES.get(number, "unknown"))
    quant = str(spec.get("quantization", "Q4_K_M"))
    return _FILE_TYPE_NUMBERS.get(quant.upper(), 15), quant
