"""Engine processes for vLLM, SGLang and MAX: one detached OpenAI-compatible server per model.

Mechanism only, no planner knowledge: start an engine from a command template, find it again
from its record in the state folder (from any later infernet process), tell whether it runs
and lists its served name on ``GET /v1/models``, stop it. What this is built on:

* an engine must outlive the ``infernet apply`` that started it, so a tiny launcher forks it
  into a session of its own and exits at once: no infernet process is ever its parent, and
  the CLI and the daemon see the same thing;
* the engine runs as the foreground child of ``/bin/sh``, the session and process-group
  leader, which waits for it and writes its exit status to ``<name>.exit``: a later process
  learns the exit code of an engine it never parented;
* a recorded PID is ours only while its create time is the recorded one (PIDs are reused);
  when the shell is gone but engine processes survive it, they are known by the run id in
  their environment (``INFERNET_ENGINE_RUN``);
* a port answered by a process infernet did not start is observed, never signalled.

``records`` keeps the folder (records, logs, exit files, the lock), ``launch`` starts an engine,
``supervision`` (``Engines``) is the API the HF backend uses.
"""

from reconciler.backends.hf.engines.records import EngineSpec, EngineStatus, safe_name
from reconciler.backends.hf.engines.supervision import Engines

__all__ = ["EngineSpec", "EngineStatus", "Engines", "safe_name"]
