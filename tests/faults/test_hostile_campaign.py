"""Campaign 8: hostile peers and hostile input while the node runs (issue 13).

Each trial picks a peer and a fault, reusing the test servers' fault modes:

* slow-loris: the control plane (``trickle``), the Ollama registry's manifest (``trickle``), a
  download source (``trickle``: headers, then a byte every half second);
* oversized bodies: a 400 MB control-plane answer (``huge``), a 1.5 GB registry config blob
  (``huge_config``), a registry config blob that is an HTML page (``bad_config``);
* lying sizes: a source that sends 200 MB more than its HEAD said (``grow``), or ends after
  4 KiB (``short``);
* deep nesting: infernet.yaml nested 2000 levels, a GGUF header with arrays nested 5000 deep
  dropped into llama.cpp's folder, or served by a source the file names.

and, with the fault on, either runs a real ``infernet watch`` (then SIGTERMs it while the fault
still holds) or a one-shot ``infernet apply --yes`` plus an ``infernet plan`` whose reader has
gone. The node has both backends (the Ollama-compatible test server and a real llama-server
router whose folder is a small tmpfs when mounts are allowed), a control plane and a local Hub.

Invariants: never a traceback; exit codes 0 or 1 (141 only for the closed pipe); SIGTERM
honoured within 5 s (exit 0); the CLI's and the daemon's peak RSS (``VmHWM``) under 300 MiB;
no partial file past the size its source announced, none left once the file no longer lists
its model, and no file under a model's name that is not the whole model;
the free space of the models' folder never under ``disk_reserve``; nothing advertised that is
not installed (nor that the file never named); the models the file keeps never lost (a
sampler, every 50 ms); what infernet did not install (a GGUF dropped into its folder) never
deleted; and once the peer behaves again, the next apply converges on the file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faults.conftest import INFERNET, Beats, Ledger, budget, listing, trials, wait_for
from tests.integration.conftest import Node, keygen
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane
from tests.servers.hub_harness import HubServer, start_hub_server
from tests.servers.llamacpp_harness import start_router
from tests.servers.tinygguf import nested_gguf, write_tiny_gguf

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL = "smollm2:135m"  # kept by every file
BASE_GGUF = "tiny-base.gguf"  # kept by every file
NEW_OLLAMA = "llama3.2:1b"  # added by the trial's file
NEW_GGUF = "tiny-new.gguf"  # added by the trial's file, from the source under attack
DEEP_GGUF = "tiny-deep.gguf"  # a source serving a GGUF header nested 5000 deep
LOCAL_DEEP = "dropped-deep.gguf"  # the same header dropped into llama.cpp's folder by hand
DEEP_YAML = "backends:\n" + "[" * 2000 + "\n"
KINDS: list[tuple[str, str]] = [
    ("control plane", "slow-loris"),
    ("registry", "oversized config blob"),
    ("source", "lies: grows past its size"),
    ("infernet.yaml", "deep nesting"),
    ("registry", "slow-loris"),
    ("control plane", "oversized answer"),
    ("source", "lies: stops short"),
    ("models folder", "deep GGUF header"),
    ("source", "slow-loris"),
    ("registry", "config blob not JSON"),
    ("source", "deep GGUF header"),
]
# Each kind once in CI, each with both runners (watch and apply) at the full size.
COUNT = trials(len(KINDS), full=3 * len(KINDS))
FAULT_SECONDS = 3.0  # how long a daemon runs against the fault before it is told to stop
RSS_LIMIT = 300 << 20
TERM_LIMIT = 5.0
SMALL_FS = 64 << 20
RESERVE = 32 << 20  # of the small filesystem: a source that floods would eat it
WORST: dict[str, float] = {}  # the highest peak RSS (MiB) and SIGTERM time (s) seen


def _worst(what: str, value: float) -> None:
    WORST[what] = max(WORST.get(what, 0.0), value)


@contextlib.contextmanager
def _models_folder(where: Path) -> Iterator[tuple[Path, bool]]:
    """llama.cpp's folder: a 64 MiB tmpfs (so a flood would reach the reserve) when mounts
    are allowed, else a plain folder (file sizes are still checked)."""
    where.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        yield where, made.returncode == 0
    finally:
        if made.returncode == 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def _peak_rss(pid: int) -> int:
    """The process's peak RSS so far, in bytes (``VmHWM``; 0 once it is gone).

    Not ``wait4``'s ``ru_maxrss``: that one starts from the forking parent's size (this
    pytest process, ~200 MiB), so it would measure the test, not the CLI."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, int]:
    """Wait for ``proc`` (at most ``timeout`` s): its exit code (None if it still runs) and
    its peak RSS in bytes, read every 20 ms until it exits (the high-water mark, so a spike
    between two reads counts; only growth in its last 20 ms could be missed)."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, _peak_rss(proc.pid))
        pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, peak
        if time.monotonic() > deadline:
            return None, peak
        time.sleep(0.02)


class _Node:
    """Both backends, a control plane and a Hub around one node, and what its files say."""

    def __init__(
        self, node: Node, cp: ControlPlaneServer, hub: HubServer, models: Path, small: bool
    ) -> None:
        self.node, self.cp, self.hub, self.models, self.small = node, cp, hub, models, small
        assert node.server is not None
        self.ollama = node.server
        self.router_url = ""
        self.beats = Beats(cp)
        self.size: dict[str, int] = {}
        for name, hidden in ((BASE_GGUF, 64), (NEW_GGUF, 128)):
            self.size[name] = write_tiny_gguf(hub.files_dir / name, name=name[:-5], hidden=hidden)
        (hub.files_dir / DEEP_GGUF).write_bytes(nested_gguf(5000))
        self.size[DEEP_GGUF] = (hub.files_dir / DEEP_GGUF).stat().st_size
        self.runs = 0

    def doc(self, *extra: Any) -> dict[str, Any]:
        served: list[Any] = [SMALL, self.gguf(BASE_GGUF), *extra]
        return {
            "served_models": served,
            "backends": {
                "ollama": {
                    "url": self.node.url,
                    "registry": self.node.registry,
                    "models_dir": str(self.node.models_dir),
                },
                "llamacpp": {"models_dir": str(self.models), "url": self.router_url},
            },
            "budget": {
                "vram": "24GiB",
                "disk_reserve": f"{RESERVE >> 20}MiB" if self.small else "1MiB",
            },
            "policy": {"max_removals": 10},
            "control_plane": {
                "url": self.cp.url,
                "key_file": str(self.node.tmp / "node.key"),
                "heartbeat_interval": "1s",
            },
        }

    def gguf(self, name: str) -> dict[str, str]:
        return {"name": name, "backend": "llamacpp", "source": self.hub.file_url(name)}

    def write(self, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        tmp = self.node.config.with_name(".infernet.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.node.config)

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [INFERNET, *args, "-c", str(self.node.config), "--state-dir", str(self.node.state)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.node.env,
                stdin=subprocess.DEVNULL,
            )

    def log(self, stem: str) -> Path:
        self.runs += 1
        return self.node.tmp / f"{self.runs:03d}-{stem}.log"

    def installed(self) -> set[str] | None:
        """Ollama's list and the finished GGUF files (None when Ollama didn't answer)."""
        have = listing(self.node)
        return None if have is None else have | {p.name for p in self.models.glob("*.gguf")}

    def files(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir())


class _Sampler(threading.Thread):
    """Every 50 ms, all through the campaign: the invariants that must hold at every moment."""

    def __init__(self, it: _Node, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.it, self.ledger = it, ledger
        self.stop = threading.Event()
        self.kept: set[str] = set()  # the models every file keeps, once first installed
        self.named = {SMALL, BASE_GGUF, NEW_OLLAMA, NEW_GGUF, DEEP_GGUF}  # ever in a file
        self.samples = 0
        self.tag = ""

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # a sampler that dies silently would check nothing more
                self.ledger.check(False, f"{self.tag} the sampler failed: {exc!r}")
            time.sleep(0.05)

    def _sample(self) -> None:
        it, check = self.it, self.ledger.check
        first = it.installed()
        served = it.beats.served()
        second = it.installed()
        if first is not None and second is not None:
            if served is not None:
                extra = served - first - second
                check(not extra, f"{self.tag} advertised, not installed: {sorted(extra)}")
                check(served <= self.named, f"{self.tag} advertised, never in the file: {served}")
            lost = self.kept - first - second
            check(not lost, f"{self.tag} kept models vanished: {sorted(lost)}")
        for path in list(it.models.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                whole = it.size.get(path.name.removeprefix(".").removesuffix(".part"))
                if path.name.endswith(".gguf") and path.name in it.size:
                    check(
                        size == it.size[path.name],
                        f"{self.tag} {path.name} is {size} bytes, not {whole}",
                    )
                elif whole is not None and path.name.endswith(".part"):
                    check(
                        size <= whole,
                        f"{self.tag} {path.name} grew to {size} bytes, past the {whole} announced",
                    )
        if it.small:
            fs = os.statvfs(it.models)
            free = fs.f_bavail * fs.f_frsize
            check(free >= RESERVE, f"{self.tag} {free} bytes free: the disk_reserve is eaten")
        self.samples += 1


def _inject(it: _Node, kind: tuple[str, str]) -> dict[str, Any] | str:
    """Turn the fault on; the file the trial runs with."""
    peer, fault = kind
    if peer == "control plane":
        if fault == "slow-loris":
            it.cp.set_down(600, mode="trickle", interval=0.5)
        else:
            it.cp.set_down(600, mode="huge", size=400_000_000)
        return it.doc(NEW_OLLAMA)
    if peer == "registry":
        if fault == "slow-loris":
            it.ollama.fault(NEW_OLLAMA, "trickle", rate=1)
        elif fault == "oversized config blob":
            it.ollama.fault(NEW_OLLAMA, "huge_config", 1_500_000_000)
        else:
            it.ollama.fault(NEW_OLLAMA, "bad_config")
        return it.doc(NEW_OLLAMA)
    if peer == "source":
        if fault == "deep GGUF header":
            return it.doc(it.gguf(DEEP_GGUF))
        pattern = f"*/{NEW_GGUF}"
        if fault == "slow-loris":
            it.hub.fault(pattern, "trickle", rate=2, method="GET")
        elif fault == "lies: grows past its size":
            it.hub.fault(pattern, "grow", 200_000_000)
        else:
            it.hub.fault(pattern, "short", 4096)
        return it.doc(it.gguf(NEW_GGUF))
    if peer == "models folder":
        (it.models / LOCAL_DEEP).write_bytes(nested_gguf(5000))
        return it.doc(it.gguf(NEW_GGUF))
    return DEEP_YAML


def _clear(it: _Node) -> None:
    it.cp.set_down(None)
    it.ollama.clear_faults()
    it.hub.clear_faults()


def _installs(kind: tuple[str, str]) -> str | None:
    """The model the trial's file adds that must be installed in spite of the fault: the
    hostile part is not on its way (a control plane; a foreign file in the folder)."""
    if kind[0] == "control plane":
        return NEW_OLLAMA
    if kind[0] == "models folder":
        return NEW_GGUF
    return None


def _check_installed(it: _Node, ledger: Ledger, tag: str, kind: tuple[str, str]) -> None:
    """What the fault's file added is installed when nothing hostile is on its way, and is
    not when the peer serving it is hostile."""
    have = it.installed() or set()
    wanted = _installs(kind)
    if wanted is not None:
        ledger.check(wanted in have, f"{tag} {wanted} not installed beside the fault")
    else:
        hostile = {NEW_OLLAMA, NEW_GGUF, DEEP_GGUF} & have
        ledger.check(not hostile, f"{tag} installed from a hostile peer: {sorted(hostile)}")


def _check_output(ledger: Ledger, tag: str, text: str) -> None:
    ledger.check("Traceback" not in text, f"{tag} traceback:\n{text[-3000:]}")
    ledger.check("RecursionError" not in text, f"{tag} RecursionError:\n{text[-3000:]}")


def _with_watch(it: _Node, ledger: Ledger, tag: str, kind: tuple[str, str]) -> None:
    """``infernet watch`` against the fault, then SIGTERM while the fault still holds."""
    log = it.log("watch")
    proc = it.popen("watch", "--tick", "1", log=log)
    try:
        time.sleep(FAULT_SECONDS)
        wanted = _installs(kind)
        if wanted is not None:  # the node goes on with its work beside the hostile part
            with contextlib.suppress(AssertionError):
                wait_for("the install", lambda: wanted in (it.installed() or set()), 20)
        elif kind[0] == "infernet.yaml":
            with contextlib.suppress(AssertionError):
                wait_for("the error", lambda: "nested more than" in log.read_text(), 10)
            ledger.check(
                "nested more than 32 levels" in log.read_text(),
                f"{tag} no one-line error: {log.read_text()[-2000:]}",
            )
        _check_installed(it, ledger, tag, kind)
        ledger.check(proc.poll() is None, f"{tag} the daemon died:\n{log.read_text()[-3000:]}")
        before = _peak_rss(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, peak = _reap(proc, 30)
        peak = max(peak, before)
        took = time.monotonic() - sent
        _worst("daemon peak RSS (MiB)", peak / (1 << 20))
        _worst("SIGTERM to exit (s)", took)
        ledger.check(took < TERM_LIMIT, f"{tag} SIGTERM took {took:.1f}s")
        ledger.check(code == 0, f"{tag} the daemon exited {code} on SIGTERM")
        ledger.check(peak < RSS_LIMIT, f"{tag} the daemon peaked at {peak >> 20} MiB")
    finally:
        if proc.poll() is None:
            proc.kill()
            _reap(proc, 10)
    _check_output(ledger, tag, log.read_text())


def _with_apply(it: _Node, ledger: Ledger, tag: str, kind: tuple[str, str]) -> None:
    """``infernet apply --yes`` against the fault, and a ``plan`` whose reader is gone."""
    log = it.log("apply")
    proc = it.popen("apply", "--yes", log=log)
    code, peak = _reap(proc, 120)
    if code is None:
        proc.kill()
        _reap(proc, 10)
    text = log.read_text()
    _worst("apply peak RSS (MiB)", peak / (1 << 20))
    ledger.check(code in (0, 1), f"{tag} apply exited {code}:\n{text[-3000:]}")
    ledger.check(peak < RSS_LIMIT, f"{tag} apply peaked at {peak >> 20} MiB")
    _check_output(ledger, tag, text)
    # A hostile control plane or a foreign file never fails an apply; a hostile source,
    # registry or file fails it, in one-line errors.
    expected = 0 if _installs(kind) is not None else 1
    ledger.check(code == expected, f"{tag} apply exited {code}, not {expected}:\n{text[-2000:]}")
    _check_installed(it, ledger, tag, kind)
    # The reader goes away before the first byte: 141, as any tool; 1 when plan fails first.
    plan = subprocess.Popen(
        [INFERNET, "plan", "-c", str(it.node.config), "--state-dir", str(it.node.state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=it.node.env,
        stdin=subprocess.DEVNULL,
    )
    assert plan.stdout is not None and plan.stderr is not None
    plan.stdout.close()
    err = plan.stderr.read().decode(errors="replace")
    plan.stderr.close()
    code, _peak = _reap(plan, 60)
    ledger.check(code in (1, 141), f"{tag} plan into a closed pipe exited {code}: {err}")
    _check_output(ledger, tag, err)


@pytest.mark.timeout(budget(120, 60, COUNT))
def test_hostile_peers_and_input_while_the_node_runs(fnode: Node, tmp_path: Path) -> None:
    ledger = Ledger("hostile peers and input")
    fnode.env.update(
        {
            "INFERNET_HTTP_TIMEOUT": "2",
            "INFERNET_PULL_STALL_TIMEOUT": "2",
            "INFERNET_WITHDRAW_TIMEOUT": "2",
            "INFERNET_LOCK_TIMEOUT": "10",
        }
    )
    with (
        _models_folder(tmp_path / "gguf") as (models, small),
        start_control_plane(tmp_path / "cp") as cp,
        start_hub_server(tmp_path / "hub", tmp_path / "hub-root") as hub,
    ):
        hub.files_dir.mkdir(parents=True, exist_ok=True)
        fnode.env.update(hub.client_env(tmp_path / "hf-home"))
        keygen(fnode)
        it = _Node(fnode, cp, hub, models, small)
        with start_router(tmp_path / "router", models) as router:
            it.router_url = router.url
            it.write(it.doc())
            first = it.popen("apply", "--yes", log=it.log("setup"))
            assert _reap(first, 90)[0] == 0, (fnode.tmp / "001-setup.log").read_text()
            sampler = _Sampler(it, ledger)
            sampler.kept = {SMALL, BASE_GGUF}
            sampler.start()
            try:
                for n in range(COUNT):
                    kind = KINDS[n % len(KINDS)]
                    # Each pass over the kinds swaps the runners: both meet every fault.
                    runner = ("watch", "apply")[(n % len(KINDS) + n // len(KINDS)) % 2]
                    tag = f"[{kind[0]}, {kind[1]}, {runner}]"
                    sampler.tag = tag
                    ledger.trial()
                    ledger.fault(f"{kind[0]}: {kind[1]}")
                    with ledger.step(f"{runner} under the fault"):
                        it.write(_inject(it, kind))
                        (_with_watch if runner == "watch" else _with_apply)(it, ledger, tag, kind)
                    with ledger.step("recovery"):
                        _clear(it)
                        _recover(it, ledger, tag, kind)
            finally:
                sampler.stop.set()
                sampler.join(5)
        assert sampler.samples > COUNT, "the sampler must have run through the trials"
    print(f"[faults] {ledger.name}: worst " + ", ".join(f"{k} {v:.1f}" for k, v in WORST.items()))
    ledger.assert_clean()


def _recover(it: _Node, ledger: Ledger, tag: str, kind: tuple[str, str]) -> None:
    """The peer behaves again and the file is back: the next apply converges on it, with
    nothing left of the fault (no partial) and nothing of someone else's deleted."""
    it.write(it.doc())
    log = it.log("recover")
    code, _peak = _reap(it.popen("apply", "--yes", log=log), 90)
    text = log.read_text()
    ledger.check(code == 0, f"{tag} the apply after the fault exited {code}:\n{text[-3000:]}")
    _check_output(ledger, tag, text)
    have = (it.installed() or set()) - {LOCAL_DEEP}
    ledger.check(have == {SMALL, BASE_GGUF}, f"{tag} not converged after the fault: {sorted(have)}")
    files = it.files()
    if kind[0] == "models folder":
        ledger.check(LOCAL_DEEP in files, f"{tag} a GGUF infernet did not install was deleted")
        (it.models / LOCAL_DEEP).unlink(missing_ok=True)
        files = it.files()
    ledger.check(files == [BASE_GGUF], f"{tag} files left in llama.cpp's folder: {files}")
