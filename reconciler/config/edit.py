"""Edits of ``infernet.yaml`` that keep every comment, quote and alignment the user wrote.

``model install``/``model remove`` and remote commands change one entry of ``served_models``.
A round trip through a YAML library re-renders the whole file: ruamel.yaml (tried first)
re-aligns ``ollama:   {…}`` flow mappings, drops the comment lines that follow a deleted
item and produces broken YAML when a commented string item becomes a mapping. So we splice
text instead: PyYAML's node marks give each item's exact character span, and only those
characters change, so a ``git diff`` shows the one entry that changed.

Every edit is checked before anything is written: the new text must pass ``desired.parse`` and
must mean exactly the old desired state plus the intended change (so a splice that misread an
unusual layout is refused, not written). The write is atomic (``files.write_atomically``),
so an edit never leaves an invalid or half-written file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler import names, units
from reconciler.config import desired
from reconciler.config.yamldoc import Loader
from reconciler.errors import ConfigError, ValidationError
from reconciler.files import write_atomically
from reconciler.model import BackendKind, Desired, ModelSpec
from reconciler.names import refers_to

BeforeWrite = Callable[[bytes, bytes], None]
"""Called with the file's bytes before and after an edit, just before the new bytes are
written: what a caller needs to undo the edit after a crash (remote commands keep it)."""


def add_model(
    path: Path, entry: str | dict[str, Any], *, before_write: BeforeWrite | None = None
) -> bool:
    """Append ``entry`` to ``served_models``; False when the model is already there."""
    doc = _Doc.open(path)
    fields = {"name": entry} if isinstance(entry, str) else dict(entry)
    if not isinstance(fields.get("name"), str):
        raise ConfigError(f"cannot add {entry!r} to {path}: a model entry needs a name")
    current = doc.desired
    backend = BackendKind(fields.get("backend", current.default_backend if current else "ollama"))
    key = names.key(backend, names.canonical(backend, fields["name"], fields.get("revision")))
    if current and any(names.key(m.backend, m.canonical) == key for m in current.models):
        return False
    ordered = {"name": fields.pop("name"), **fields}  # name first, as people write entries
    before = _specs(current)

    def expected(new: Desired) -> bool:
        # Everything as it was, plus exactly one entry at the end: the one we added.
        after = _specs(new)
        return after[:-1] == before and bool(after) and _key(after[-1]) == key

    doc.commit(
        doc.appended(entry if isinstance(entry, str) else ordered),
        lambda new: expected(new) and _settings_unchanged(current, new),
        what=f"add {ordered['name']}",
        before_write=before_write,
    )
    return True


def remove_model(path: Path, name: str, backend: BackendKind | None) -> bool:
    """Remove every entry that is ``name`` (canonically, or its ``advertise_as``); False if none."""
    doc = _Doc.open(path)
    indexes = doc.matching(name, backend)
    if not indexes:
        return False
    text = doc.without(indexes)
    remaining = [m for i, m in enumerate(_specs(doc.desired)) if i not in indexes]
    doc.commit(
        text,
        lambda new: _specs(new) == remaining and _settings_unchanged(doc.desired, new),
        what=f"remove {name}",
    )
    return True


def set_keep_alive(
    path: Path, name: str, value: float | str, *, backend: BackendKind | None = None
) -> bool:
    """Set ``keep_alive`` of the entries that are ``name``; False when none is or all already are.

    ``value`` is anything the file accepts (``-1``, ``"forever"``, ``"10m"``, seconds); a float
    ``FOREVER`` is written as ``forever``. A plain string entry becomes a mapping.
    """
    try:
        seconds = units.parse_keep_alive(value)
    except ValueError as exc:
        raise ConfigError(f"cannot set keep_alive of {name} in {path}: {exc}") from None
    written = _yaml_keep_alive(value)
    doc = _Doc.open(path)
    indexes = [i for i in doc.matching(name, backend) if doc.spec(i).keep_alive != seconds]
    if not indexes:
        return False
    text = doc.text
    for index in sorted(indexes, reverse=True):
        text = doc.with_keep_alive(text, index, written)
    wanted = [
        replace(m, keep_alive=seconds) if i in indexes else m
        for i, m in enumerate(_specs(doc.desired))
    ]
    doc.commit(
        text,
        lambda new: _specs(new) == wanted and _settings_unchanged(doc.desired, new),
        what=f"set keep_alive of {name}",
    )
    return True


# --------------------------------------------------------------------------- the document


@dataclass
class _Doc:
    """The file as read: its text, what it means, and the nodes that locate each entry."""

    path: Path
    data: bytes  # the file's bytes as read (empty when it is missing)
    text: str
    bom: bool
    newline: str
    desired: Desired | None  # None: the file is missing or has no content yet
    models: SequenceNode | None
    root: MappingNode | None

    @classmethod
    def open(cls, path: Path) -> _Doc:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        text = data.decode("utf-8-sig")
        try:
            root = yaml.compose(text, Loader=Loader)
        except yaml.YAMLError:
            desired.parse(text, path=str(path))  # raises ValidationError with every problem
            raise
        mapping = root if isinstance(root, MappingNode) else None
        value = _value_of(mapping, "served_models") if mapping else None
        current = None
        # An invalid file is not edited: the user must see and fix its problems first. Only
        # an empty file, or one without served_models at all, is let through for add_model.
        if not _is_empty(root) and not (mapping and _key_node(mapping, "served_models") is None):
            current = desired.parse(text, path=str(path))
        models = value if isinstance(value, SequenceNode) else None
        newline = "\r\n" if "\r\n" in text else "\n"
        bom = data.startswith(b"\xef\xbb\xbf")
        return cls(path, data, text, bom, newline, current, models, mapping)

    def spec(self, index: int) -> ModelSpec:
        # A valid file has no duplicate entries, so specs and list items correspond one to one.
        assert self.desired is not None
        return self.desired.models[index]

    def matching(self, name: str, backend: BackendKind | None) -> list[int]:
        if self.desired is None:
            return []
        return [i for i, spec in enumerate(self.desired.models) if refers_to(spec, name, backend)]

    # ---- text splices; each returns the new text of the whole file

    def appended(self, entry: str | dict[str, Any]) -> str:
        text, nl = self.text, self.newline
        seq = self.models
        if seq is None:
            # No served_models yet (new file, or only other settings): add a block list.
            body = _block_item(entry, "  ", " ", nl, style=None)
            prefix = "" if not text or text.endswith("\n") else nl
            return f"{text}{prefix}served_models:{nl}{body}"
        last = seq.value[-1] if seq.value else None
        style = _style_of(last)
        if seq.flow_style:
            rendered = _flow_item(entry, style)
            if last is None:
                at = seq.start_mark.index + 1  # just inside '['
                return text[:at] + rendered + text[at:]
            at = _content_end(last)
            return text[:at] + ", " + rendered + text[at:]
        assert last is not None  # a block sequence has at least one item
        dash = _dash_of(text, last)
        indent = text[_line_start(text, dash) : dash]
        gap = (
            text[dash + 1 : last.start_mark.index]
            if "\n" not in text[dash : last.start_mark.index]
            else " "
        )
        at = _line_end(text, _content_end(last))
        if at == len(text) and not text.endswith("\n"):
            text += nl
            at = len(text)
        return text[:at] + _block_item(entry, indent, gap, nl, style=style) + text[at:]

    def without(self, indexes: list[int]) -> str:
        seq = self.models
        assert seq is not None
        text, items = self.text, seq.value
        cuts = []  # spans of the original text, so each is computed before anything moves
        for index in indexes:
            item = items[index]
            if not seq.flow_style:
                start = _line_start(text, _dash_of(text, item))
                cuts.append((start, _line_end(text, _content_end(item))))
                continue
            # Cut the item with one comma: up to the next item we keep, or else from the end of
            # the item before it; an only item leaves "[]".
            kept_after = [i for i in range(index + 1, len(items)) if i not in indexes]
            if kept_after:
                cuts.append((item.start_mark.index, items[kept_after[0]].start_mark.index))
            elif index > 0:
                cuts.append((_content_end(items[index - 1]), _content_end(item)))
            else:
                cuts.append((item.start_mark.index, _content_end(item)))
        # Neighbours removed together have overlapping cuts: merge them, then cut back to front.
        merged: list[list[int]] = []
        for start, end in sorted(cuts):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in reversed(merged):
            text = text[:start] + text[end:]
        if len(indexes) == len(items) and not seq.flow_style:
            # The block list is gone: say "empty" explicitly, or the key would read as null.
            assert self.root is not None
            key = _key_node(self.root, "served_models")
            assert key is not None
            colon = text.index(":", key.end_mark.index) + 1
            text = text[:colon] + " []" + text[colon:]
        return text

    def with_keep_alive(self, text: str, index: int, value: Any) -> str:
        seq = self.models
        assert seq is not None
        item = seq.value[index]
        rendered = _render(value, None)
        if isinstance(item, ScalarNode):
            name = text[item.start_mark.index : item.end_mark.index]  # as written, quotes kept
            start, end = item.start_mark.index, item.end_mark.index
            if seq.flow_style:
                return f"{text[:start]}{{name: {name}, keep_alive: {rendered}}}{text[end:]}"
            # The name stays on its line (with its comment); keep_alive goes on the next one.
            column = item.start_mark.column
            line_end = _line_end(text, end)
            if line_end == len(text) and not text.endswith("\n"):
                text += self.newline
                line_end = len(text)
            added = f"{' ' * column}keep_alive: {rendered}{self.newline}"
            return f"{text[:start]}name: {text[start:line_end]}{added}{text[line_end:]}"
        assert isinstance(item, MappingNode)
        existing = _value_of(item, "keep_alive")
        if existing is not None and _within(existing, item):
            start, end = existing.start_mark.index, _content_end(existing)
            return text[:start] + rendered + text[end:]
        if item.flow_style:
            at = _content_end(item.value[-1][1])  # after the last value, inside the '}'
            return f"{text[:at]}, keep_alive: {rendered}{text[at:]}"
        at = _content_end(item)
        first_key = item.value[0][0]
        line_end = _line_end(text, at)
        if line_end == len(text) and not text.endswith("\n"):
            text += self.newline
            line_end = len(text)
        added = f"{' ' * first_key.start_mark.column}keep_alive: {rendered}{self.newline}"
        return text[:line_end] + added + text[line_end:]

    # ---- check and write

    def commit(
        self,
        text: str,
        expected: Callable[[Desired], bool],
        *,
        what: str,
        before_write: BeforeWrite | None = None,
    ) -> None:
        try:
            new = desired.parse(text, path=str(self.path))
        except ValidationError as exc:
            first = exc.problems[0].message
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            raise ConfigError(
                f"refusing to {what} in {self.path}: the file would become invalid: {first}{more}"
            ) from exc
        if not expected(new):
            raise ConfigError(
                f"cannot {what} in {self.path} automatically (its layout is unusual, e.g. YAML "
                "aliases in served_models); edit it by hand"
            )
        data = (b"\xef\xbb\xbf" if self.bom else b"") + text.encode("utf-8")
        if before_write is not None:
            before_write(self.data, data)
        write_atomically(self.path, data)


# --------------------------------------------------------------------------- helpers


def _key(spec: ModelSpec) -> str:
    return names.key(spec.backend, spec.canonical)


def _specs(state: Desired | None) -> list[ModelSpec]:
    """The entries without their line numbers, which an edit above them shifts."""
    return [replace(m, line=0) for m in state.models] if state else []


def _settings_unchanged(old: Desired | None, new: Desired) -> bool:
    """True when everything but ``served_models`` means what it meant before the edit."""
    if old is None:
        return True  # there was no valid file to compare with; the new one was validated
    return replace(new, source=old.source, models=()) == replace(old, models=())


def _is_empty(node: Node | None) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag.endswith(":null"))


def _key_node(mapping: MappingNode, key: str) -> ScalarNode | None:
    for key_node, _ in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return key_node
    return None


def _value_of(mapping: MappingNode, key: str) -> Node | None:
    for key_node, value in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            found: Node = value
            return found
    return None


def _within(node: Node, container: Node) -> bool:
    """False for an alias or merge whose node lives elsewhere in the file."""
    return container.start_mark.index <= node.start_mark.index < _content_end(container) + 1


def _content_end(node: Node) -> int:
    """Index just past a node's last character (block collections' own end marks overshoot)."""
    if isinstance(node, ScalarNode) or getattr(node, "flow_style", False):
        end: int = node.end_mark.index
        return end
    if isinstance(node, MappingNode) and node.value:
        return max(_content_end(v) for pair in node.value for v in pair)
    if isinstance(node, SequenceNode) and node.value:
        return max(_content_end(v) for v in node.value)
    end = node.start_mark.index
    return end


def _dash_of(text: str, item: Node) -> int:
    """Index of the '-' that starts a block sequence item."""
    return text.rindex("-", 0, item.start_mark.index)


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _line_end(text: str, index: int) -> int:
    """Index just past the end of the line holding ``index - 1`` (its comment and newline)."""
    if index > 0 and text[index - 1] == "\n":  # block scalars end at the next line's start
        return index
    newline = text.find("\n", index)
    return len(text) if newline < 0 else newline + 1


def _style_of(item: Node | None) -> str | None:
    """The quote style of an existing entry's name, so a new entry looks like its neighbours."""
    if isinstance(item, MappingNode):
        item = _value_of(item, "name")
    return (item.style or None) if isinstance(item, ScalarNode) else None


def _render(value: Any, style: str | None, *, flow: bool = True) -> str:
    """One YAML scalar: quoted like ``style`` for strings, plain when that reads back the same."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if style == "'":
        return "'" + text.replace("'", "''") + "'"
    if not style:  # plain ('' from the C loader, None from the Python one)
        probe = f"[{text}]" if flow else f"k: {text}"
        try:
            loaded = yaml.load(probe, Loader=Loader)
        except yaml.YAMLError:
            loaded = None
        if loaded in ([text], {"k": text}):
            return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted one


def _flow_item(entry: str | dict[str, Any], style: str | None) -> str:
    if isinstance(entry, str):
        return _render(entry, style)
    inner = ", ".join(
        f"{key}: {_render(value, style if key == 'name' else None)}" for key, value in entry.items()
    )
    return "{" + inner + "}"


def _block_item(
    entry: str | dict[str, Any], indent: str, gap: str, nl: str, *, style: str | None
) -> str:
    if isinstance(entry, str):
        return f"{indent}-{gap}{_render(entry, style, flow=False)}{nl}"
    lines = []
    pad = " " * (len(indent) + 1 + len(gap))
    for number, (key, value) in enumerate(entry.items()):
        lead = f"{indent}-{gap}" if number == 0 else pad
        rendered = _render(value, style if key == "name" else None, flow=False)
        lines.append(f"{lead}{key}: {rendered}{nl}")
    return "".join(lines)


def _yaml_keep_alive(value: float | str) -> float | int | str:
    """How a keep_alive is written: ``forever`` for pinned floats, whole seconds as ints."""
    if isinstance(value, float):
        if value < 0:
            return "forever"
        return int(value) if value.is_integer() else value
    return value
