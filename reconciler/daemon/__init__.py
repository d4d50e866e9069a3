"""``infernet watch``: the loop (file events, ticks, signals), its backoff and stop, the remote
commands it runs (a verb table), metrics and logs."""
