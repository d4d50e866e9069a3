"""YAML text → plain Python value, with the line and column of every key and value.

``yaml.safe_load`` throws away positions and silently keeps the last of two duplicate keys, so
we compose the node tree ourselves (libyaml's C parser when PyYAML was built with it) and
build the value while recording marks by JSON path. Schema and semantic errors are then located
by looking their path up here. Nothing in this module raises on bad input: every finding is a
``Finding`` the caller turns into a ``Problem``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# CSafeLoader is ~10x faster. Syntax errors are re-parsed with the pure-Python loader, whose
# messages and marks do not depend on the libyaml version.
Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)

JsonPath = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_NULL_TAG = "tag:yaml.org,2002:null"
_TABS = "tabs are not allowed in YAML indentation; use spaces"
_MAX_NODES = 100_000  # alias "billion laughs" guard: a real infernet.yaml has a few hundred
# Composing, building and schema-checking each recurse once per level: 2000 '[' overflow
# Python's stack. A real infernet.yaml nests 5 levels; stop long before any recursion limit.
MAX_DEPTH = 32
_TOO_DEEP = (
    f"lists and mappings nested more than {MAX_DEPTH} levels deep here; infernet.yaml needs "
    "only a few levels: look for unclosed brackets or runaway indentation or aliases"
)
# The parser's grammar terms, in the words of someone editing the file.
_PLAIN_WORDS = {
    "simple key": "key",
    "plain scalar": "value",
    "quoted scalar": "quoted string",
    "block scalar": "multi-line string",
    "flow sequence": "[...] list",
    "flow mapping": "{...} mapping",
    "block sequence": "list",
    "block mapping": "mapping",
    "block collection": "list or mapping",
}
_TOKEN_WORDS = {
    "'<block end>'": "the end of the indented block",
    "<block end>": "the end of the indented block",
    "'<block sequence start>'": "a list item ('- ') at the wrong indentation",
    "'<block mapping start>'": "a key at the wrong indentation",
    "'<stream end>'": "the end of the file",
    "'<document start>'": "'---'",
    "mapping values are not allowed here": (
        "mapping values are not allowed here (quote a value that contains ': ')"
    ),
}


@dataclass(frozen=True)
class Mark:
    """A 1-based position in the text."""

    line: int
    column: int


@dataclass(frozen=True)
class Finding:
    """A problem found while reading the YAML, before any schema applies."""

    mark: Mark
    message: str


@dataclass
class Document:
    """The parsed file: ``value`` is None when the file has no content at all."""

    value: Any = None
    values: dict[JsonPath, Mark] = field(default_factory=dict)  # where each value starts
    keys: dict[JsonPath, Mark] = field(default_factory=dict)  # where the key of a value starts
    findings: list[Finding] = field(default_factory=list)

    def locate(self, path: JsonPath, *, key: bool = False) -> Mark:
        """The mark of ``path`` (its key when ``key``), else of its nearest located parent."""
        table = self.keys if key else self.values
        while path:
            if path in table:
                return table[path]
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), Mark(1, 1))


def format_path(path: JsonPath) -> str:
    """``served_models[1].backend`` from ``("served_models", 1, "backend")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def read(text: str) -> Document:
    """Parse ``text`` into a ``Document``; YAML errors become findings, never exceptions."""
    doc = Document()
    deep = _too_deep(text)
    if deep is not None:
        doc.findings.append(deep)
        return doc
    loader = Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError:
        doc.findings.extend(_syntax_findings(_python_error(text), text))
        return doc
    except yaml.reader.ReaderError as exc:  # a control character the reader refuses
        doc.findings.append(_reader_finding(exc, text))
        return doc
    except yaml.YAMLError as exc:
        # str() of a YAML error spans lines; a finding is one line.
        doc.findings.append(Finding(Mark(1, 1), "invalid YAML: " + " ".join(str(exc).split())))
        return doc
    finally:
        loader.dispose()
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
        return doc
    _Builder(doc).build(root)
    return doc


def _too_deep(text: str) -> Finding | None:
    """Where the text first nests deeper than ``MAX_DEPTH``, or None.

    Found from the parser's events, which come from a loop, not a recursion: composing the
    node tree (both parsers recurse per level) happens only once the depth is known to be
    bounded. libyaml gives up at its own limit (1000) while reading ahead, so that error is
    this finding too. After any other syntax error the pure-Python parser looks again: the
    caller composes with it to word the error, and it sees exactly these events.
    """
    try:
        return _deeper_than_max(Loader, text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if "nesting depth" in (exc.problem or "") and mark is not None:
            return Finding(Mark(mark.line + 1, mark.column + 1), _TOO_DEEP)
    except yaml.YAMLError:
        pass
    if Loader is yaml.SafeLoader:
        return None
    try:
        return _deeper_than_max(yaml.SafeLoader, text)
    except yaml.YAMLError:
        return None


def _deeper_than_max(
    loader_class: type[yaml.SafeLoader] | type[yaml.CSafeLoader], text: str
) -> Finding | None:
    loader = loader_class(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    at = event.start_mark
                    where = Mark(at.line + 1, at.column + 1) if at is not None else Mark(1, 1)
                    return Finding(where, _TOO_DEEP)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        loader.dispose()
    return None


def _reader_finding(exc: yaml.reader.ReaderError, text: str) -> Finding:
    """Where the refused character is, in one line (PyYAML's own message takes two)."""
    at = max(0, min(exc.position, len(text)))
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    char = exc.character
    shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
    return Finding(
        Mark(line, column),
        f"invalid YAML: character {shown} is not allowed in YAML ({exc.reason}); remove it",
    )


def _python_error(text: str) -> yaml.MarkedYAMLError:
    """The pure-Python parser's error for ``text``, which the fast parser just rejected.

    Its wording and marks are the same on every install (libyaml's differ by version and
    are terser), and a file with a syntax error is the slow path anyway.
    """
    loader = yaml.SafeLoader(text)
    try:
        loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        return exc
    finally:
        loader.dispose()
    # Both parsers implement YAML 1.1; should they ever disagree, say so plainly.
    return yaml.MarkedYAMLError(problem="not valid YAML")  # pragma: no cover


def _syntax_findings(exc: yaml.MarkedYAMLError, text: str) -> list[Finding]:
    """Say what is wrong in words that point at the fix: tabs and truncation get their own."""
    tabs = [
        Finding(Mark(number, line.index("\t") + 1), _TABS)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and "\t" in line[: len(line) - len(line.lstrip())]
    ]
    mark = exc.problem_mark or exc.context_mark
    if not tabs and mark is not None and "'\\t'" in (exc.problem or ""):
        tabs = [Finding(Mark(mark.line + 1, mark.column + 1), _TABS)]  # e.g. "-\tname: x"
    if tabs:
        return tabs
    context = _context_words(exc)
    content_end = len(text.rstrip())
    if mark is not None and mark.index >= content_end:
        # The parser gave up at the very end: the file stops mid-structure (a half-written
        # save or an interrupted copy). Point at the last character, where the user will look.
        last = text[:content_end].split("\n")
        where = Mark(len(last), len(last[-1]) + 1)
        # A context that starts where the text ends ("a flow node at the end") says nothing.
        opened = exc.context_mark is not None and exc.context_mark.index < content_end
        inside = f" inside {context}" if context and opened else ""
        return [Finding(where, f"the file ends unexpectedly{inside}: is it half-written?")]
    problem = exc.problem or "not valid YAML"
    for token, words in _TOKEN_WORDS.items():
        problem = problem.replace(token, words)
    if isinstance(exc, yaml.composer.ComposerError) and "another document" in problem:
        problem = "found a second document ('---'); infernet.yaml holds exactly one"
    detail = f" (in {context})" if context else ""
    where = Mark(mark.line + 1, mark.column + 1) if mark is not None else Mark(1, 1)
    return [Finding(where, f"invalid YAML: {problem}{detail}")]


def _context_words(exc: yaml.MarkedYAMLError) -> str:
    """'a [...] list that starts at line 1, column 16' from the parser's context."""
    if not exc.context or not exc.context.startswith("while "):
        return ""
    words = exc.context.removeprefix("while parsing ").removeprefix("while scanning ")
    if not words.startswith(("a ", "an ")):  # "for the next token" names nothing to look for
        return ""
    for jargon, plain in _PLAIN_WORDS.items():
        words = words.replace(jargon, plain)
    mark = exc.context_mark
    if mark is None:
        return words
    return f"{words} that starts at line {mark.line + 1}, column {mark.column + 1}"


class _Builder:
    """Walks the node tree once, building values and recording marks and findings."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.constructor = yaml.constructor.SafeConstructor()
        self.active: set[int] = set()  # ids of nodes on the current path, to stop alias cycles
        self.count = 0
        self.too_deep = False

    def build(self, root: Node) -> None:
        self.doc.value = self.node(root, ())

    def node(self, node: Node, path: JsonPath) -> Any:
        self.doc.values[path] = _mark(node)
        self.count += 1
        if self.count > _MAX_NODES:
            if self.count == _MAX_NODES + 1:
                self.found(node, "the file expands to too many values (aliases?); simplify it")
            return None
        if len(path) > MAX_DEPTH:
            # Aliases of aliases nest deeper than the text does; the text itself was checked.
            if not self.too_deep:
                self.too_deep = True
                self.found(node, _TOO_DEEP)
            return None
        if id(node) in self.active:
            self.found(node, "an alias refers to the mapping or list that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            if isinstance(node, SequenceNode):
                return [self.node(item, (*path, i)) for i, item in enumerate(node.value)]
            return self.scalar(node)
        finally:
            self.active.discard(id(node))

    def scalar(self, node: Node) -> Any:
        # Timestamps stay text: no field here is a date, and a date object would only turn
        # into a confusing "expected a string" message.
        if node.tag == _TIMESTAMP_TAG:
            return node.value
        try:
            return self.constructor.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            self.found(node, f"invalid YAML: {exc.problem or exc}")
        except (yaml.YAMLError, ValueError) as exc:
            self.found(node, f"invalid YAML value: {exc}")
        return None

    def mapping(self, node: MappingNode, path: JsonPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, Mark] = {}
        merged: list[dict[str, Any]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self.merge_sources(value_node, path))
                continue
            key = self.key(key_node)
            if key is None:
                continue
            if key in first_seen:
                first = first_seen[key]
                prefix = f"{format_path(path)}: " if path else ""
                self.found(
                    key_node,
                    f"{prefix}duplicate key '{key}' (first at line {first.line}); "
                    "YAML would keep only this one, so remove one of them",
                )
            first_seen[key] = _mark(key_node)
            self.doc.keys[(*path, key)] = first_seen[key]
            result[key] = self.node(value_node, (*path, key))
        # `<<: *defaults` fills in keys the mapping does not set itself, as YAML 1.1 says.
        for source in merged:
            for key, value in source.items():
                result.setdefault(key, value)
        return result

    def merge_sources(self, node: Node, path: JsonPath) -> list[dict[str, Any]]:
        nodes = node.value if isinstance(node, SequenceNode) else [node]
        sources = []
        for item in nodes:
            # Recorded under '<<' so the merged mapping's marks don't overwrite this one's.
            value = self.node(item, (*path, "<<")) if isinstance(item, MappingNode) else None
            if not isinstance(value, dict):
                self.found(item, "'<<' merges only mappings")
                continue
            sources.append(value)
        return sources

    def key(self, node: Node) -> str | None:
        if not isinstance(node, ScalarNode):
            self.found(node, "mapping keys must be plain words, not lists or mappings")
            return None
        # `on:` or `1:` would be True or 1 in YAML 1.1; keep the text the user wrote.
        return str(node.value)

    def found(self, node: Node, message: str) -> None:
        self.doc.findings.append(Finding(_mark(node), message))


def _mark(node: Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)
