"""The pure planner: ``plan(desired, observed, owned) -> Plan``, the VRAM and disk budget, and the
saved-plan document. No I/O, no clock."""
