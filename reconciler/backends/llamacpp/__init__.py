"""The llama.cpp backend: a folder of GGUF files (``backend``) served by ``llama-server`` in
router mode (``router``), and the estimate of what a router child holds (``estimate``)."""

from __future__ import annotations

from reconciler.backends.driver import Driver, Family
from reconciler.backends.llamacpp import estimate, rules, settings
from reconciler.model import BackendKind

DRIVER = Driver(
    kind=BackendKind.LLAMACPP,
    title="llama.cpp",
    canonical=rules.canonical,
    same_model="same GGUF file",
    revision_hint=(
        " (a llamacpp hf:// source names it in the URL: hf://org/repo@revision/file.gguf)"
    ),
    claims=rules.claims,
    # Also our cached llama-server-<version>-<key> builds.
    processes=("llama-server",),
    run_context=estimate.run_context,
    default_context=estimate.default_context,
    estimate_parts=lambda facts, context, parallel, accelerator: estimate.parts(
        facts, context, parallel, accelerator=accelerator
    ),
    plan_warnings=rules.plan_warnings,
)

FAMILY = Family(
    name=settings.FAMILY,
    drivers=(DRIVER,),
    schema=settings.SCHEMA,
    parse=settings.parse,
    models_dir=lambda llamacpp: llamacpp.models_dir,
    adapters="reconciler.backends.llamacpp.backend:open_backends",
)
