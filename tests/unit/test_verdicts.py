"""A schema verdict is remembered only as "valid", only for the very same schema and document,
and only from a file that is this user's own: the cache can save a check, never change one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import desired, schemacheck, verdicts

SCHEMA = desired.schema_text()
VALID: dict[str, Any] = {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": 2}}
INVALID: dict[str, Any] = {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": "x"}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(verdicts.ENV_VAR, str(folder))
    return folder


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every document jsonschema was asked about."""
    asked: list[Any] = []
    real = schemacheck._validator

    class Counting:
        def __init__(self, schema_text: str) -> None:
            self.inner = real(schema_text)

        def iter_errors(self, instance: Any) -> Any:
            asked.append(instance)
            return self.inner.iter_errors(instance)

    monkeypatch.setattr(schemacheck, "_validator", Counting)
    return asked


def test_a_valid_document_is_checked_once(cache: Path, validations: list[Any]) -> None:
    assert schemacheck.check(VALID, SCHEMA) == []
    assert schemacheck.check(dict(VALID), SCHEMA) == []
    assert len(validations) == 1
    verdict_file = cache / verdicts.FILE_NAME
    assert verdict_file.stat().st_mode & 0o777 == 0o600
    assert cache.stat().st_mode & 0o777 == 0o700


def test_an_invalid_document_is_checked_and_worded_every_time(
    cache: Path, validations: list[Any]
) -> None:
    first = schemacheck.check(INVALID, SCHEMA)
    second = schemacheck.check(INVALID, SCHEMA)
    assert first and first == second
    assert len(validations) == 2
    assert not (cache / verdicts.FILE_NAME).exists()


@pytest.mark.parametrize(
    "changed",
    [
        {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": "2"}},  # "2" vs 2
        {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": 2.0}},  # 2.0 vs 2
        {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": True}},  # true vs 1
        {"served_models": ["qwen2.5:0.5b"], "policy": {"parallel_pulls": 2, "x": 1}},
    ],
)
def test_a_document_that_differs_in_any_way_is_checked_again(
    cache: Path, validations: list[Any], changed: dict[str, Any]
) -> None:
    assert schemacheck.check(VALID, SCHEMA) == []
    schemacheck.check(changed, SCHEMA)
    assert len(validations) == 2


def test_a_key_json_would_rewrite_is_never_remembered() -> None:
    # json.dumps turns {2: …} into {"2": …}: two documents, one spelling. No key at all.
    assert verdicts.digest(SCHEMA, {"policy": {2: "x"}}) is None
    assert verdicts.digest(SCHEMA, {"when": __import__("datetime").date(2026, 1, 1)}) is None
    assert verdicts.digest(SCHEMA, {"x": float("nan")}) is None
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert verdicts.digest(SCHEMA, deep) is None


def test_another_schema_is_another_verdict(cache: Path, validations: list[Any]) -> None:
    assert schemacheck.check(VALID, SCHEMA) == []
    other = SCHEMA.replace('"served_models"', '"served_models" ', 1)
    assert other != SCHEMA
    assert schemacheck.check(VALID, other) == []
    assert len(validations) == 2


def _plant(cache: Path, key: str, mode: int) -> Path:
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = cache / verdicts.FILE_NAME
    target.write_text(key + "\n")
    target.chmod(mode)
    return target


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_verdict_file_others_can_write_is_not_believed(
    cache: Path, validations: list[Any], mode: int
) -> None:
    key = verdicts.digest(SCHEMA, INVALID)
    assert key is not None
    _plant(cache, key, mode)
    assert schemacheck.check(INVALID, SCHEMA) != []
    assert len(validations) == 1


def test_a_verdict_file_through_a_symlink_or_in_an_open_folder_is_not_believed(
    cache: Path, tmp_path: Path, validations: list[Any]
) -> None:
    key = verdicts.digest(SCHEMA, INVALID)
    assert key is not None
    elsewhere = _plant(tmp_path / "elsewhere", key, 0o600)
    cache.mkdir(mode=0o700)
    (cache / verdicts.FILE_NAME).symlink_to(elsewhere)
    assert schemacheck.check(INVALID, SCHEMA) != []
    (cache / verdicts.FILE_NAME).unlink()
    _plant(cache, key, 0o600)
    cache.chmod(0o777)
    assert schemacheck.check(INVALID, SCHEMA) != []
    assert len(validations) == 2


def test_garbage_and_oversize_files_are_ignored(cache: Path) -> None:
    key = verdicts.digest(SCHEMA, VALID)
    assert key is not None
    target = _plant(cache, key.upper() + "\nnot a digest\n" + key[:-1], 0o600)
    assert not verdicts.known_valid(key)
    target.write_text((key + "\n") * (verdicts.CAPACITY + 1))
    assert not verdicts.known_valid(key)


def test_the_cache_keeps_the_most_recent_verdicts(cache: Path) -> None:
    keys = [f"{i:064x}" for i in range(verdicts.CAPACITY + 6)]
    for key in keys:
        verdicts.remember(key)
    lines = (cache / verdicts.FILE_NAME).read_text().split()
    assert lines == keys[-verdicts.CAPACITY :]
    verdicts.remember(keys[-10])  # seen again: the most recent now
    assert (cache / verdicts.FILE_NAME).read_text().split()[-1] == keys[-10]


def test_a_cache_that_cannot_be_written_is_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validations: list[Any]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(verdicts.ENV_VAR, str(blocker / "cache"))
    assert schemacheck.check(VALID, SCHEMA) == []
    assert schemacheck.check(INVALID, SCHEMA) != []
    assert schemacheck.check(VALID, SCHEMA) == []
    assert len(validations) == 3


def test_the_cache_lives_in_the_users_cache_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(verdicts.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert verdicts.cache_dir() == Path("/somewhere/cache/infernet")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid per XDG: ignored
    monkeypatch.setenv("HOME", "/home/op")
    assert verdicts.cache_dir() == Path("/home/op/.cache/infernet")
    assert os.path.isabs(str(verdicts.cache_dir()))
