"""``llama-quantize``, built from the same llama.cpp source as ``llama-server`` and cached beside
it (``python -m tests.servers.llamabuild --quantize``), quantizes a real GGUF: the accuracy
benchmark's quantized rows (bench/accuracy.py ``--quantized``) rest on it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconciler.backends.gguf import meta as ggufmeta
from tests.servers import llamabuild
from tests.servers.tinygguf import write_tiny_gguf


def test_quantize_is_cached_beside_the_server_under_the_same_key() -> None:
    server, quantize = llamabuild.binary_path(), llamabuild.binary_path(llamabuild.QUANTIZE)
    assert server.parent == quantize.parent
    assert server.name.startswith("llama-server-") and quantize.name.startswith("llama-quantize-")
    assert server.name.rsplit("-", 1)[1] == quantize.name.rsplit("-", 1)[1]  # version + flags


def test_quantize_writes_k_quants_and_falls_back_on_narrow_rows(tmp_path: Path) -> None:
    binary = llamabuild.build(llamabuild.QUANTIZE)
    source, out = tmp_path / "f16.gguf", tmp_path / "q4km.gguf"
    # 256 wide: K-quant blocks fit the attention matrices; ffn_down is 320 wide and can't.
    write_tiny_gguf(source, name="q", hidden=256, ff=320, heads=4, f16=True)
    done = subprocess.run(
        [str(binary), str(source), str(out), "Q4_K_M", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    meta, tensors, _start = ggufmeta.read_header(out)
    kinds = {t.name: t.kind for t in tensors}
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert kinds["blk.0.attn_q.weight"] == "Q4_K"
    # 320 columns are not a multiple of 256: llama-quantize logs it and takes a 32-block type
    assert kinds["blk.0.ffn_down.weight"] in {"Q5_0", "Q8_0"}
    assert "falling back to" in done.stdout + done.stderr
