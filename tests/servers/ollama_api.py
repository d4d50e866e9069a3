"""Handlers of the Ollama API (`server/routes.go`): inventory, loading, unloading, inference.

Chats with messages stream through :mod:`tests.servers.ollama_chat`; generate and embed
answer at once (``ok``, deterministic vectors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from tests.servers import ollama_chat
from tests.servers.ollama_chat import ChatControl
from tests.servers.ollama_download import DownloadManager
from tests.servers.ollama_gojson import BodyError, MissingBody, decode_request
from tests.servers.ollama_http import Handler
from tests.servers.ollama_names import Name, go_quote, go_time, parse_name
from tests.servers.ollama_pull import ProgressSink, Puller
from tests.servers.ollama_registry import Registry
from tests.servers.ollama_scheduler import Scheduler
from tests.servers.ollama_store import DIGEST_RE, LocalManifest, LocalModel, Store, details

_S, _B, _D, _M, _A = ("str", ""), ("bool", ""), ("duration", ""), ("map", ""), ("any", "")
PULL = {"model": _S, "name": _S, "insecure": _B, "username": _S, "password": _S, "stream": _B}
SHOW = {"model": _S, "name": _S, "system": _S, "template": _S, "verbose": _B, "options": _M}
DELETE = {"model": _S, "name": _S}
COPY = {"source": _S, "destination": _S}
GENERATE = {
    "model": _S,
    "prompt": _S,
    "suffix": _S,
    "system": _S,
    "template": _S,
    "context": ("list", "[]int"),
    "stream": _B,
    "raw": _B,
    "format": _A,
    "keep_alive": _D,
    "images": ("list", "[]api.ImageData"),
    "options": _M,
    "think": _A,
}
CHAT = {
    "model": _S,
    "messages": ("list", "[]api.Message"),
    "tools": ("list", "api.Tools"),
    "stream": _B,
    "format": _A,
    "keep_alive": _D,
    "options": _M,
    "think": _A,
}
EMBED = {
    "model": _S,
    "input": _A,
    "keep_alive": _D,
    "truncate": _B,
    "options": _M,
    "dimensions": ("int", "int"),
}
EMBEDDINGS = {"model": _S, "prompt": _S, "keep_alive": _D, "options": _M}


@dataclass
class State:
    version: str
    store: Store
    scheduler: Scheduler
    registry: Registry
    downloads: DownloadManager
    puller: Puller
    chat: ChatControl = dataclasses.field(default_factory=ChatControl)


class ApiHandler(Handler):
    state: State

    def decode(self, struct: str, fields: dict[str, tuple[str, str]]) -> dict[str, Any] | None:
        """Bind the body like gin; on failure answer 400 and return None."""
        try:
            return decode_request(self.body, struct, fields)
        except MissingBody:
            self.reply_error(400, "missing request body")
        except BodyError as e:
            self.reply_error(400, str(e))
        return None


def _now_utc() -> str:
    return go_time(time.time_ns(), utc=True)


def load_model(state: State, manifest: LocalManifest) -> LocalModel | None:
    try:
        return state.store.load(manifest)
    except (OSError, ValueError):
        return None


def root(h: ApiHandler) -> None:
    h.reply(200, b"Ollama is running", "text/plain; charset=utf-8")


def version(h: ApiHandler) -> None:
    h.reply_json(200, {"version": h.state.version})


def tags(h: ApiHandler) -> None:
    models = []
    for m in h.state.store.manifests_list():
        model = load_model(h.state, m)
        config = h.state.store.config(m) if model is None else model.config
        if config is None:
            continue  # Ollama skips manifests whose config blob cannot be read
        short = m.name.display_shortest()
        entry = {
            "name": short,
            "model": short,
            "modified_at": go_time(m.mtime_ns),
            "size": m.size(),
            "digest": m.digest,
            "details": model.details() if model else details(config),
        }
        if model is not None:
            entry["capabilities"] = model.capabilities()
        models.append((m.mtime_ns, entry))
    models.sort(key=lambda item: -item[0])
    h.reply_json(200, {"models": [entry for _, entry in models]})


def ps(h: ApiHandler) -> None:
    models = [
        {
            "name": r.name,
            "model": r.name,
            "size": r.size,
            "digest": r.digest,
            "details": r.details,
            "expires_at": go_time(r.expires_at_ns()),
            "size_vram": r.size_vram,
            "context_length": r.num_ctx,
        }
        for r in h.state.scheduler.ps()
    ]
    h.reply_json(200, {"models": models})


def _go_value(v: Any, sharp: bool) -> str:
    """Go's ``%v`` / ``%#v`` for decoded JSON scalars."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v) == int(v) else repr(float(v))
    return go_quote(str(v)) if sharp else str(v)


def _modelfile_quote(s: str) -> str:
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def _param_items(params: dict[str, Any]) -> list[tuple[str, Any]]:
    items = []
    for key in sorted(params):
        values = params[key] if isinstance(params[key], list) else [params[key]]
        items += [(key, v) for v in values]
    return items


def show(h: ApiHandler) -> None:
    req = h.decode("ShowRequest", SHOW)
    if req is None:
        return
    text = req.get("model") or req.get("name") or ""
    if not text:
        h.reply_error(400, "model is required")
        return
    name = parse_name(text)
    if not name.is_valid():
        h.reply_error(400, "invalid model name")
        return
    manifest = h.state.store.find(name)
    model = load_model(h.state, manifest) if manifest else None
    if manifest is None or model is None:
        h.reply_error(404, f"model '{name.display_shortest()}' not found")
        return
    verbose = bool(req.get("verbose"))
    items = _param_items(model.params)
    lines = [f"FROM {model.weights_path}"] + [f"FROM {p}" for p in model.projectors]
    if model.template:
        lines.append(f"TEMPLATE {_modelfile_quote(model.template)}")
    if model.system:
        lines.append(f"SYSTEM {_modelfile_quote(model.system)}")
    lines += [f"PARAMETER {k} {_modelfile_quote(_go_value(v, False))}" for k, v in items]
    lines += [f"LICENSE {_modelfile_quote(text_)}" for text_ in model.license]
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {manifest.name.display_shortest()}\n\n" + "".join(f"{ln}\n" for ln in lines)
    )
    info = {
        k: v for k, v in model.kv.items() if k not in ("general.name", "tokenizer.chat_template")
    }
    if not verbose:
        info = {k: None if isinstance(v, list) else v for k, v in info.items()}
    resp: dict[str, Any] = {
        "license": "\n".join(model.license),
        "modelfile": modelfile,
        "parameters": "\n".join(f"{k:<30} {_go_value(v, True)}" for k, v in items),
        "template": model.template,
        "system": model.system,
        "details": model.details(),
        "model_info": info,
        "capabilities": model.capabilities(),
        "modified_at": go_time(manifest.mtime_ns),
        "requires": model.config.get("requires", ""),
    }
    h.reply_json(200, {k: v for k, v in resp.items() if v or k == "model_info"})


def pull(h: ApiHandler) -> None:
    req = h.decode("PullRequest", PULL)
    if req is None:
        return
    name = parse_name(req.get("model") or req.get("name") or "")
    if not name.is_valid():
        h.reply_error(400, "invalid model name")
        return
    name = h.state.store.existing_name(name)
    sink = ProgressSink(h, req.get("stream", True) is not False)
    sink.run(lambda: h.state.puller.pull(name, sink.emit, sink.gone))


def delete(h: ApiHandler) -> None:
    req = h.decode("DeleteRequest", DELETE)
    if req is None:
        return
    text = req.get("model") or req.get("name") or ""
    if not text:
        h.reply_error(400, "model is required")
        return
    name = parse_name(text)
    if not name.is_valid():
        h.reply_error(400, f"name {go_quote(text)} is invalid")
        return
    manifest = h.state.store.find(name)
    if manifest is None:
        h.reply_error(404, f"model '{text}' not found")
        return
    h.state.store.delete(manifest)
    h.reply(200)


def copy(h: ApiHandler) -> None:
    req = h.decode("CopyRequest", COPY)
    if req is None:
        return
    names: list[Name] = []
    for field in ("source", "destination"):
        text = req.get(field, "")
        name = parse_name(text)
        if not name.is_valid():
            h.reply_error(400, f"{field} {go_quote(text)} is invalid")
            return
        names.append(h.state.store.existing_name(name))
    src, dst = names
    if src.path_parts() == dst.path_parts():
        h.reply(200)
        return
    manifest = h.state.store.find(src)
    if manifest is None:
        h.reply_error(404, f"model {go_quote(req.get('source', ''))} not found")
        return
    h.state.store.copy(manifest, dst)
    h.reply(200)


def _num_ctx(h: ApiHandler, options: dict[str, Any] | None, model: LocalModel) -> int | None:
    """``options.num_ctx``, else the model's own PARAMETER; replies 500 on a bad type."""
    return _int_option(h, options, model, "num_ctx")


def _int_option(
    h: ApiHandler, options: dict[str, Any] | None, model: LocalModel, option: str
) -> int | None:
    """An integer option, else the model's own PARAMETER; replies 500 on a bad type."""
    value = (options or {}).get(option, model.params.get(option))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        h.reply_error(500, f'option "{option}" must be of type integer')
        raise ValueError
    return int(value)


def _schedule(h: ApiHandler, model: LocalModel, name: Name, req: dict[str, Any]) -> bool:
    try:
        num_ctx = _num_ctx(h, req.get("options"), model)
    except ValueError:
        return False
    h.state.scheduler.use(model, name.display_shortest(), req.get("keep_alive"), num_ctx)
    return True


def _find_model(h: ApiHandler, name: Name) -> LocalModel | None:
    manifest = h.state.store.find(name) if name.is_valid() else None
    return load_model(h.state, manifest) if manifest else None


def _vector(seed: str, dims: int) -> list[float]:
    raw = hashlib.shake_256(seed.encode()).digest(max(dims, 1) * 2)
    return [
        round((int.from_bytes(raw[i : i + 2], "little") / 65535 - 0.5), 6)
        for i in range(0, dims * 2, 2)
    ]


def generate(h: ApiHandler) -> None:
    req = h.decode("GenerateRequest", GENERATE)
    if req is None:
        return
    text = req.get("model", "")
    name = h.state.store.existing_name(parse_name(text))
    model = _find_model(h, name)
    if model is None:
        h.reply_error(404, f"model '{text}' not found")
        return
    prompt = req.get("prompt", "")
    base = {"model": text, "created_at": _now_utc(), "response": ""}
    if not prompt and req.get("keep_alive") == 0:
        h.state.scheduler.expire(model)
        h.reply_json(200, base | {"done": True, "done_reason": "unload"})
        return
    if "completion" not in model.capabilities():
        h.reply_error(400, f"{go_quote(text)} does not support generate")
        return
    if not _schedule(h, model, name, req):
        return
    if not prompt:
        h.reply_json(200, base | {"done": True, "done_reason": "load"})
        return
    final = base | {"done": True, "done_reason": "stop", "context": [1, 2, 3]}
    _answer(h, req, [base | {"response": "ok", "done": False}, final])


def _answer(h: ApiHandler, req: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """A canned completion: NDJSON parts when streaming, else the merged final object."""
    if req.get("stream", True) is False:
        merged = parts[-1] | {k: v for k, v in parts[0].items() if k in ("response", "message")}
        h.reply_json(200, merged)
        return
    sink = ProgressSink(h, True)
    for part in parts:
        sink.emit(part)
    sink.finish()


def chat(h: ApiHandler) -> None:
    started_ns = time.monotonic_ns()
    req = h.decode("ChatRequest", CHAT)
    if req is None:
        return
    text = req.get("model", "")
    messages = req.get("messages") or []
    empty = {"role": "assistant", "content": ""}
    base = {"model": text, "created_at": _now_utc(), "message": empty}
    if not messages and req.get("keep_alive") == 0:
        model = _find_model(h, parse_name(text))
        if model is None:
            h.reply_error(404, f"model '{text}' not found")
            return
        h.state.scheduler.expire(model)
        h.reply_json(200, base | {"done": True, "done_reason": "unload"})
        return
    name = parse_name(text)
    if not name.is_valid():
        h.reply_error(400, "model is required")
        return
    name = h.state.store.existing_name(name)
    model = _find_model(h, name)
    if model is None:
        h.reply_error(404, f"model '{text}' not found")
        return
    if "completion" not in model.capabilities():
        h.reply_error(400, f"{go_quote(text)} does not support chat")
        return
    if not messages:
        if _schedule(h, model, name, req):
            h.reply_json(200, base | {"done": True, "done_reason": "load"})
        return
    try:
        num_ctx = _num_ctx(h, req.get("options"), model)
        num_predict = _int_option(h, req.get("options"), model, "num_predict")
    except ValueError:
        return
    ollama_chat.respond(
        h,
        h.state.scheduler,
        h.state.chat,
        model=model,
        name=name,
        req=req,
        num_ctx=num_ctx,
        num_predict=num_predict,
        started_ns=started_ns,
    )


def embed(h: ApiHandler) -> None:
    req = h.decode("EmbedRequest", EMBED)
    if req is None:
        return
    raw = req.get("input")
    inputs: list[str] = []
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        inputs = list(raw)
    elif raw is not None:
        h.reply_error(400, "invalid input type")
        return
    text = req.get("model", "")
    name = h.state.store.existing_name(parse_name(text))
    model = _find_model(h, name)
    if model is None:
        h.reply_error(404, f"model {go_quote(text)} not found, try pulling it first")
        return
    if not _schedule(h, model, name, req):
        return
    dims = model.kv_int("embedding_length")
    vectors = [_vector(f"{model.weights_digest}:{s}", dims) for s in inputs]
    h.reply_json(200, {"model": text, "embeddings": vectors})


def embeddings(h: ApiHandler) -> None:
    req = h.decode("EmbeddingRequest", EMBEDDINGS)
    if req is None:
        return
    text = req.get("model", "")
    name = parse_name(text)
    if not name.is_valid():
        h.reply_error(400, "model is required")
        return
    model = _find_model(h, name)
    if model is None:
        h.reply_error(404, f"model {go_quote(text)} not found, try pulling it first")
        return
    if not _schedule(h, model, name, req):
        return
    prompt = req.get("prompt", "")
    dims = model.kv_int("embedding_length")
    vector = _vector(f"{model.weights_digest}:{prompt}", dims) if prompt else []
    h.reply_json(200, {"embedding": vector})


def head_blob(h: ApiHandler, digest: str) -> None:
    if digest and not DIGEST_RE.fullmatch(digest):
        h.reply_error(400, "invalid digest format")
        return
    if not h.state.store.blob_path(digest).is_file():
        h.reply_error(404, f"blob {go_quote(digest)} not found")
        return
    h.reply(200)


def create_blob(h: ApiHandler, digest: str) -> None:
    if digest and not DIGEST_RE.fullmatch(digest):
        h.reply_error(400, "invalid digest format")
        return
    path = h.state.store.blob_path(digest)
    if path.is_file():
        h.reply(200)
        return
    got = "sha256:" + hashlib.sha256(h.body).hexdigest()
    if got != digest:
        h.reply_error(400, f"digest mismatch, expected {go_quote(digest)}, got {go_quote(got)}")
        return
    path.write_bytes(h.body)
    h.reply(201)


def openai_models(h: ApiHandler) -> None:
    data = [
        {
            "id": m.name.display_shortest(),
            "object": "model",
            "created": m.mtime_ns // 1_000_000_000,
            "owned_by": m.name.namespace,
        }
        for m in sorted(h.state.store.manifests_list(), key=lambda m: -m.mtime_ns)
    ]
    h.reply_json(200, {"object": "list", "data": data})


def not_implemented(h: ApiHandler, *_: str) -> None:
    h.reply_error(501, f"{h.path} is not implemented by the Ollama test server")
