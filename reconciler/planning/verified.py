"""Verified means it answered: a model is advertised only after its canary passed.

A model's weights (its digest, or its revision for a repository) are proven once by a one-token
generation on the backend that serves it (one embedding for an embedding model), run by the
apply that installs them (``converge.executor``) or, for weights installed otherwise, by the
next apply. Until then the model is not advertised now, though the plan counts it among what
it will advertise once applied; a model whose canary failed is not advertised at all, and the
plan, ``status`` and the heartbeat's errors say why. This is the check the real network's
failed installs lacked: a model listed and routed to that could not load.
"""

from __future__ import annotations

from reconciler.model import Check, ModelSpec, Owned
from reconciler.names import key


def verdict(
    spec: ModelSpec, digest: str | None, owned: Owned, *, embedding: bool
) -> Check | str | None:
    """None when ``spec``'s weights at ``digest`` answered their canary; the ``Check`` to run
    when they were never tested; why not, when they failed it (one line)."""
    record = owned.canaries.get(key(spec.backend, spec.canonical))
    if record is not None and record.digest == digest:
        if record.ok:
            return None
        return f"{spec.advertise_as}: did not answer a one-token test generation ({record.error})"
    return Check(
        backend=spec.backend,
        canonical=spec.canonical,
        model=spec.name,
        advertise_as=spec.advertise_as,
        digest=digest,
        keep_alive=spec.keep_alive,
        context=spec.context,
        embedding=embedding,
    )
