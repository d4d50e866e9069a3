"""The llama.cpp backend: a folder of GGUF files served by ``llama-server`` in router mode."""
