"""What a model's KV cache and quantization are, from the facts its GGUF keys (or its
``config.json``) give: shared by the budget and the backends' own estimates. Pure."""

from __future__ import annotations

from reconciler.backends.gguf.header import file_type_name
from reconciler.model import ModelFacts


def quantization(facts: ModelFacts) -> str | None:
    """The artifact's quantization: the backend's string, else the GGUF ``general.file_type``."""
    return facts.quantization or file_type_name(facts.file_type)


def kv_bytes(facts: ModelFacts, context: int) -> int | None:
    """f16 K and V for every layer at ``context`` tokens; None without the GGUF keys."""
    if not (facts.block_count and facts.head_count_kv):
        return None
    head_dim = None
    if facts.embedding_length and facts.head_count:
        head_dim = facts.embedding_length // facts.head_count
    k_len = facts.key_length or head_dim
    v_len = facts.value_length or head_dim
    if not (k_len and v_len):
        return None
    return facts.block_count * context * facts.head_count_kv * (k_len + v_len) * 2
