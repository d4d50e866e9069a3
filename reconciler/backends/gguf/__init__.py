"""GGUF, shared by the backends that serve it: the bounded header parser and the facts read from
a file's metadata and tensor table."""
