"""Backend adapters: each turns one inference server's API into the reconciler's types."""
