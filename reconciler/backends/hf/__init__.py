"""vLLM, SGLang and MAX: HuggingFace repositories in the hub cache (``cache``), each served by
an engine process of its own (``engines``), three kinds of one family (``backend``)."""

from __future__ import annotations

from reconciler.backends.driver import Driver, Family
from reconciler.backends.hf import rules, settings
from reconciler.model import BackendKind


def _engine(
    kind: BackendKind, title: str, processes: tuple[str, ...], exact: tuple[str, ...] = ()
) -> Driver:
    return Driver(
        kind=kind,
        title=title,
        gguf_quantization=False,
        canonical=rules.canonical,
        engine=True,
        revisions=True,
        source_refusal=(
            "{kind} models are HuggingFace repositories named by name: and revision:; remove source"
        ),
        processes=processes,
        processes_exact=exact,
        claim_share=settings.claim_share,
        pull_source=rules.pull_source,
    )


FAMILY = Family(
    name=settings.FAMILY,
    drivers=(
        # `vllm serve`, vllm.entrypoints..., VLLM::EngineCore workers
        _engine(BackendKind.VLLM, "vLLM", ("vllm",)),
        # sglang.launch_server, sglang::scheduler
        _engine(BackendKind.SGLANG, "SGLang", ("sglang",)),
        # Modular's `max serve` CLI; "max" alone is too common a prefix
        _engine(BackendKind.MAX, "MAX", ("max-serve", "max.entrypoints", "max.serve"), ("max",)),
    ),
    schema=settings.SCHEMA,
    defs=settings.DEFS,
    parse=settings.parse,
    models_dir=lambda hf: hf.cache_dir,
    adapters="reconciler.backends.hf.backend:open_backends",
    merge_states=rules.share,
)
