"""The shipped JSON Schemas, and their errors in words a user can act on.

``jsonschema``'s own messages ("Additional properties are not allowed ('keepalive' was
unexpected)") name neither the place nor the fix. Each error is rewritten to start with its
JSON path and say what would be valid; unknown keys get a did-you-mean. Schemas with a ``title``
that the caller knows (``size``, ``duration``…) are described by the caller's wording, so one
sentence per kind of value lives next to the code that parses it.

``jsonschema`` takes 60-100 ms to import, so it is imported only when a check runs, and a
document already found valid against the same schema is not checked again (``verdicts``); the
standard-library helpers only errors need are imported lazily too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.config import verdicts
from reconciler.config.yamldoc import JsonPath, format_path
from reconciler.redact import redact

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError as SchemaError
    from jsonschema.protocols import Validator

_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "nothing",
}


@dataclass(frozen=True)
class SchemaFinding:
    """One schema violation: where (``at_key``: point at the key, not its value) and what."""

    path: JsonPath
    message: str
    at_key: bool = False


def read_schema_text(filename: str) -> str:
    """A schema's text: from the installed wheel, else from the checkout's ``schemas/``."""
    from importlib import resources

    # The wheel force-includes schemas/ as reconciler/_schemas; an editable checkout has none.
    shipped = resources.files("reconciler").joinpath("_schemas", filename)
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "schemas" / filename
    return checkout.read_text(encoding="utf-8")


def with_backends(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (a fresh dict, changed in place) with the backend registry's kinds as
    ``$defs.backend``'s enum and, where it has a ``backends`` section, each family's settings
    schema there and the ``$defs`` the families bring: what the file may name comes from the
    registry, never from a list kept here."""
    from reconciler import backends

    defs = schema.setdefault("$defs", {})
    defs.setdefault("backend", {"title": "backend"})["enum"] = [k.value for k in backends.kinds()]
    section = schema.get("properties", {}).get("backends")
    if section is not None:
        properties = section.setdefault("properties", {})
        for family in backends.families():
            properties[family.name] = json.loads(json.dumps(family.schema))
            defs.update(json.loads(json.dumps(family.defs)))
    return schema


def shipped_or_assembled(filename: str) -> str:
    """The schema ``filename`` as the registry assembles it (``with_backends``), as text: the
    shipped file itself, byte for byte, when that is what the registry assembles (the built-in
    backends alone), else the assembled schema as JSON."""
    shipped = read_schema_text(filename)
    assembled = with_backends(json.loads(shipped))
    if assembled == json.loads(shipped):
        return shipped
    return json.dumps(assembled, indent=2, ensure_ascii=False) + "\n"


@functools.cache
def _validator(schema_text: str) -> Validator:
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 3.0 as an integer; Python code downstream would then get a float
    # (`context: 8192.0`). Integers here are ints, as a YAML or JSON reader produces them.
    def is_int(_checker: object, instance: object) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_int)
    strict: Any = validators.extend(Draft202012Validator, type_checker=checker)  # type: ignore[no-untyped-call]
    validator: Validator = strict(json.loads(schema_text))
    return validator


def check(
    instance: Any, schema_text: str, *, expectations: Mapping[str, str] | None = None
) -> list[SchemaFinding]:
    """Every violation of the schema ``schema_text`` by ``instance``, sorted by path."""
    findings: list[SchemaFinding] = []
    key = verdicts.digest(schema_text, instance)
    if key is not None and verdicts.known_valid(key):
        return findings
    for error in _validator(schema_text).iter_errors(instance):
        findings.extend(_translate(error, expectations or {}))
    if key is not None and not findings:
        verdicts.remember(key)
    return sorted(
        findings, key=lambda f: [(0, p, "") if isinstance(p, int) else (1, 0, p) for p in f.path]
    )


def describe(value: Any) -> str:
    """A value as the user wrote it: ``'three'``, ``3``, ``true``, ``a mapping``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    # A URL is shown without credentials or query: this text reaches status and heartbeats.
    return redact(repr(value)) if isinstance(value, str) else repr(value)


def _translate(error: SchemaError, expectations: Mapping[str, str]) -> Iterator[SchemaFinding]:
    path: JsonPath = tuple(error.absolute_path)
    keyword = str(error.validator)
    rule: Any = error.validator_value
    schema = error.schema if isinstance(error.schema, dict) else {}
    value = error.instance
    where = format_path(path)
    prefix = f"{where}: " if where else ""
    expected = expectations.get(str(schema.get("title", "")))

    if keyword == "additionalProperties" and isinstance(value, dict):
        allowed = list(schema.get("properties", {}))
        inside = f"in {where}" if where else "at the top level"
        for key in value:
            if key not in allowed:
                yield SchemaFinding((*path, key), _unknown_key(key, inside, allowed), at_key=True)
        return
    if keyword == "required" and isinstance(value, dict):
        for key in rule:
            if key not in value:
                title = schema.get("properties", {}).get(key, {}).get("title", "")
                hint = f": {expectations[title]}" if title in expectations else ""
                yield SchemaFinding(path, f"{prefix}missing required key '{key}'{hint}")
        return
    if expected is not None and keyword in (
        "type",
        "pattern",
        "minimum",
        "maximum",
        "minLength",
        "const",
    ):
        yield SchemaFinding(path, f"{prefix}expected {expected}, got {describe(value)}")
        return
    yield SchemaFinding(path, prefix + _plain_words(keyword, rule, value, schema))


def _unknown_key(key: str, inside: str, allowed: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}' {inside}; did you mean '{close[0]}'?"
    return f"unknown key '{key}' {inside}; valid keys are: {', '.join(allowed)}"


def _plain_words(keyword: str, rule: Any, value: Any, schema: Mapping[str, Any]) -> str:
    """The generic translation of one failed keyword."""
    if keyword == "type":
        types = rule if isinstance(rule, list) else [rule]
        words = " or ".join(_TYPE_WORDS.get(str(t), str(t)) for t in types)
        return f"expected {words}, got {describe(value)}"
    if keyword == "enum":
        return f"{describe(value)} is not one of {', '.join(str(v) for v in rule)}"
    if keyword == "const":
        return f"expected {json.dumps(rule)}, got {describe(value)}"
    if keyword in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        kind = "an integer" if schema.get("type") == "integer" else "a number"
        if low is not None and high is not None:
            return f"expected {kind} from {low} to {high}, got {describe(value)}"
        bound = f"at least {low}" if keyword == "minimum" else f"at most {high}"
        return f"expected {kind} of {bound}, got {describe(value)}"
    if keyword in ("minLength", "maxLength"):
        low, high = schema.get("minLength"), schema.get("maxLength")
        if keyword == "minLength" and low == 1 and not value:
            return "must not be empty"
        if low is not None and high is not None:
            return f"expected {low} to {high} characters, got {len(value)}"
        bound = f"at least {low}" if keyword == "minLength" else f"at most {high}"
        return f"expected {bound} characters, got {len(value)}"
    if keyword == "pattern":
        return f"{describe(value)} does not match the pattern {rule}"
    if keyword in ("minItems", "maxItems"):
        bound = "at least" if keyword == "minItems" else "at most"
        return f"expected {bound} {rule} items, got {len(value)}"
    return f"{describe(value)} is not valid here ({keyword}: {json.dumps(rule)})"
