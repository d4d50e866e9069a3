"""``ansible-test sanity`` for the collection, in its own virtual environment.

``ansible-test sanity --requirements`` installs each test's pinned tools (pylint, yamllint,
voluptuous…) into the Python that runs it, so it never runs from ``.venv``: it gets
``.cache/ansible-venv``, made on first use with the same ansible-core version ``.venv`` has (the
one ``pip install -e '.[test]'`` resolved, which the other Ansible tests use). ansible-test
writes its results under the collection's ``tests/output``, so it runs on a copy of the
collection in a temporary ``ansible_collections/infernet/node``.

    python -m tests.ansible.sanity [ansible-test sanity arguments]
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible_collections" / "infernet" / "node"
VENV = REPO / ".cache" / "ansible-venv"


def ansible_venv() -> Path:
    """``.cache/ansible-venv`` with this environment's ansible-core version, made once."""
    version = importlib.metadata.version("ansible-core")
    python = VENV / "bin" / "python"
    stamp = VENV / ".ansible-core"
    if not (python.exists() and stamp.exists() and stamp.read_text() == version):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"ansible-core=={version}"], check=True)
        stamp.write_text(version)
    return VENV


# ansible-test makes each tool's environment without pip and fetches a get-pip script from
# ci-files.testing.ansible.com, which a machine reaching only a PyPI mirror cannot resolve
# (ansible/ansible#77304). It looks in its cache first: this stand-in installs the pip it asks
# for from the standard library's ensurepip and the configured index instead.
# (ensurepip points PIP_CONFIG_FILE at /dev/null in its own process: the pip run after it gets
# the environment as it was, so the machine's pip configuration, index and CA apply.)
_GET_PIP = """\
import ensurepip, os, subprocess, sys
env = dict(os.environ)
ensurepip.bootstrap(upgrade=True)
wanted = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *wanted], env=env))
"""


def _stand_in_get_pip(venv: Path) -> None:
    (source,) = venv.glob("lib/python*/site-packages/ansible_test/_internal/python_requirements.py")
    pip = re.search(r"pip='([0-9.]+)'", source.read_text())
    if pip is None:
        return  # another layout: let ansible-test fetch its own
    cache = venv / "home" / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip[1].replace('.', '_')}.py").write_text(_GET_PIP)


def run(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """``ansible-test sanity --requirements ARGS`` on a copy of the collection."""
    venv = ansible_venv()
    _stand_in_get_pip(venv)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(prefix="infernet-sanity-") as tmp:
        copy = Path(tmp) / "ansible_collections" / "infernet" / "node"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tar.gz", "output")
        shutil.copytree(COLLECTION, copy, ignore=ignore)
        return subprocess.run(
            [
                str(venv / "bin" / "ansible-test"),
                "sanity",
                "--color",
                "no",
                "--python",
                python,
                "--requirements",
                *args,
            ],
            cwd=copy,
            env={
                **os.environ,
                "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                # ansible-test keeps the tools' environments under ~/.ansible: kept here.
                "HOME": str(venv / "home"),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            },
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


if __name__ == "__main__":
    done = run(*sys.argv[1:])
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
