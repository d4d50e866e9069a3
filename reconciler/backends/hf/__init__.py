"""vLLM, SGLang and MAX: HuggingFace repositories in the hub cache, each served by an engine
process of its own (``engines``)."""
