"""The Ollama backend: the server's API through the official client (``backend``), the
registry it pulls from (``registry``), its name grammar (``names``) and settings."""

from __future__ import annotations

from reconciler.backends.driver import Driver, Family
from reconciler.backends.ollama import names, settings
from reconciler.model import BackendKind

DRIVER = Driver(
    kind=BackendKind.OLLAMA,
    title="Ollama",
    canonical=names.canonical,
    same_model="same model after normalising case and default tag",
    source_refusal=(
        "Ollama models come from the registry, not a source URL; remove source, or use "
        "backend: llamacpp for a GGUF file"
    ),
    # The server, `ollama runner`, and the older ollama_llama_server.
    processes=("ollama",),
    remote_install_problem=names.registry_problem,
)

FAMILY = Family(
    name=settings.FAMILY,
    drivers=(DRIVER,),
    schema=settings.SCHEMA,
    parse=settings.parse,
    models_dir=lambda ollama: ollama.models_dir,
    adapters="reconciler.backends.ollama.backend:open_backends",
)
