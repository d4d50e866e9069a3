#!/usr/bin/python
# Copyright: infernet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
#
# Ansible's module layout puts DOCUMENTATION, EXAMPLES and RETURN before the imports (E402).
# It runs on the managed host's Python (3.8 or later for ansible-core 2.16+): no 3.10 syntax.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: models
short_description: Keep a GPU inference node's models exactly as declared, with infernet
version_added: "0.1.0"
description:
  - Writes the node's C(infernet.yaml) from the task's options and brings the node to it through
    the C(infernet) command line (C(infernet plan --json), then C(infernet apply --json --yes)).
    Missing models are pulled, pins are loaded, models infernet installed that left the list are
    removed, and the VRAM and disk budget is checked before a byte is downloaded.
  - The file is written atomically and only when its content changes. A file whose plan has
    errors (the budget does not fit, a backend cannot be reached, an invalid entry) is not put in
    place and the task fails with infernet's one-line error, so the node keeps its last good file.
  - C(changed) is true only when the file changed or apply changed the node, so a second run
    reports no change.
  - In check mode nothing is written and nothing is applied; C(infernet plan --json) runs against
    the file the task would write (in a temporary directory), and the actions it reports are the
    ones a real run would take.
  - With C(--diff) the result shows the file's diff and the plan's actions.
  - When C(executable) is infernet's own console script for the interpreter the module runs on
    (C(ansible_python_interpreter) set to the Python of infernet's virtual environment), the
    module runs those commands in its own process, which saves starting and importing infernet
    a second time on every host; the result is the same. Any other C(executable) (another
    Python's, a wrapper) runs as a subprocess.
  - The option names are those of C(infernet.yaml) (see C(infernet schema)). The file itself is
    validated by infernet, so entries follow exactly the same schema.
options:
  served_models:
    description:
      - The file's C(served_models), exactly as in C(infernet.yaml) - model names, or mappings
        with C(name), C(backend), C(keep_alive), C(quantization), C(context), C(advertise_as),
        C(vram), C(protect), C(source), C(sha256), C(revision).
      - An empty list removes every model infernet installed, and infernet refuses it unless
        C(policy.allow_empty) is true.
    type: list
    elements: raw
    required: true
  default_backend:
    description:
      - The file's C(default_backend) - the backend of entries that are plain names.
      - Left out of the file when not given (infernet's default is C(ollama)).
    type: str
  backends:
    description:
      - The file's C(backends) mapping, for example the Ollama server's C(url) and C(models_dir)
        under C(ollama), or llama.cpp's under C(llamacpp).
      - Left out of the file when not given or empty.
    type: dict
  budget:
    description:
      - The file's C(budget) mapping - C(vram) (V(auto) or a size such as V(22GiB)), C(reserve),
        C(disk_reserve).
      - Left out of the file when not given or empty.
    type: dict
  control_plane:
    description:
      - The file's C(control_plane) mapping (C(url), C(key_file), C(role), C(node_id),
        C(heartbeat_interval), C(commands), C(ca_bundle), C(insecure)).
      - A plain V(http://) C(url) off loopback is refused unless C(insecure=true).
      - Left out of the file when not given or empty - the node then sends no heartbeats.
    type: dict
  policy:
    description:
      - The file's C(policy) mapping (C(prune), C(max_removals), C(allow_empty),
        C(parallel_pulls), C(self_heal), C(updates)).
      - Left out of the file when not given or empty.
    type: dict
  settings:
    description:
      - Any other top-level keys of the file, for example C(version).
      - A key may be given here or as its own option, not both.
    type: dict
    default: {}
  config:
    description:
      - Path of the C(infernet.yaml) to write. Its directory must exist.
    type: path
    default: /etc/infernet/infernet.yaml
    aliases: [path]
  state_dir:
    description:
      - infernet's state directory (C(--state-dir)).
      - When not given, infernet uses C($INFERNET_STATE_DIR), else its platform default
        (C(/var/lib/infernet) for root).
    type: path
  executable:
    description:
      - The C(infernet) command to run - a path, or a name looked up on the host's C(PATH).
    type: path
    default: infernet
    aliases: [infernet_bin]
  apply:
    description:
      - Apply the plan after writing the file.
      - When V(false) the file is validated, written and planned (the task reports the pending
        actions), and a running C(infernet watch) applies it; plan errors are then warnings.
    type: bool
    default: true
  mode:
    description:
      - The permissions of the file, as for M(ansible.builtin.copy), for example V('0644') or
        V(u=rw,g=r,o=r).
    type: raw
    default: "0644"
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
notes:
  - C(infernet apply) waits for the node lock while C(infernet watch) is reconciling, at most
    C($INFERNET_LOCK_TIMEOUT) seconds (30 by default); set it with the task's C(environment) when
    the daemon may be in the middle of a long pull.
  - Long pulls run within the task; use C(async) for models that take longer than the connection
    may stay open.
seealso:
  - name: infernet README, Fleets with Ansible
    description: The collection, its role, and a fleet playbook with rolling batches.
    link: https://github.com/infernet/infernet#fleets-with-ansible
author:
  - infernet contributors (@infernet)
"""

EXAMPLES = r"""
- name: Serve two models on this node
  infernet.node.models:
    served_models:
      - qwen2.5:14b
      - name: llama3.2:3b
        keep_alive: forever
    backends:
      ollama:
        url: http://127.0.0.1:11434
    budget:
      vram: auto
      reserve: 1GiB
  register: infernet

- name: Show what the node advertises
  ansible.builtin.debug:
    msg: "{{ infernet.advertised }}"

- name: Only write the file; infernet watch applies it
  infernet.node.models:
    config: /etc/infernet/infernet.yaml
    state_dir: /var/lib/infernet
    executable: /opt/infernet/bin/infernet
    served_models: "{{ infernet_served_models }}"
    policy:
      prune: managed
      max_removals: 3
    apply: false
"""

RETURN = r"""
config_path:
  description: Absolute path of the file the task manages.
  returned: always
  type: str
  sample: /etc/infernet/infernet.yaml
actions:
  description:
    - The plan's actions, in the order they are (or would be) made, as in C(infernet plan --json).
    - In check mode, the actions a real run would take.
  returned: when infernet planned
  type: list
  elements: dict
  sample:
    - op: pull
      model: qwen2.5:14b
      backend: ollama
      canonical: registry.ollama.ai/library/qwen2.5:14b
      reason: in served_models, not installed
      download_bytes: 8988124069
      vram_bytes: 10200547328
advertised:
  description:
    - The names the node advertises - after apply, what it serves; otherwise what it would serve
      once the plan is applied.
  returned: when infernet planned
  type: list
  elements: str
  sample: [qwen2.5:14b, llama3.2:3b]
budget:
  description:
    - The plan's budget figures, as in C(infernet plan --json) (C(plan.schema.json)).
    - Among them C(vram_total_bytes), C(vram_available_bytes), C(vram_pinned_bytes),
      C(largest_swap_in_bytes), C(reserve_bytes), C(fits), C(disk_free_bytes),
      C(disk_reserve_bytes), C(download_bytes) and per-model C(estimates).
  returned: when infernet planned
  type: dict
  sample:
    vram_total_bytes: 25769803776
    vram_available_bytes: 25769803776
    vram_source: config
    fits: true
    disk_free_bytes: 412700000000
    download_bytes: 8988124069
errors:
  description: The plan's errors; a plan with errors is never applied.
  returned: when infernet planned
  type: list
  elements: str
  sample: ["qwen2.5:14b needs 10.1 GiB ... > VRAM budget 8.0 GiB; pick a smaller quantization"]
outcomes:
  description: What apply did, one entry per action (C(op), C(model), C(result), C(error)).
  returned: when apply ran
  type: list
  elements: dict
  sample:
    - op: pull
      model: qwen2.5:14b
      result: ok
      error: null
converged:
  description: True when apply ran and the node now matches the file.
  returned: when apply ran
  type: bool
"""

import contextlib
import io
import json
import os
import sys
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_native

from ansible_collections.infernet.node.plugins.module_utils.config_text import render

# The file's keys, in the order they are written; the first five are options of their own.
SECTIONS = ("default_backend", "backends", "budget", "control_plane", "policy")
ORDER = ("version", "served_models", *SECTIONS)
DEFAULT_CONFIG = "/etc/infernet/infernet.yaml"


class CliFailure(Exception):
    """infernet failed; ``msg`` is its one-line error, ``extra`` what it still told us."""

    def __init__(self, msg, extra=None):
        super().__init__(msg)
        self.msg = msg
        self.extra = extra or {}


def build_document(params):
    """The file's content as a mapping, from the task's options."""
    settings = dict(params["settings"] or {})
    clash = sorted(k for k in settings if k == "served_models" or params.get(k) is not None)
    if clash:
        raise ValueError(f"{', '.join(clash)} given both as an option and in settings; use one")
    doc = {"served_models": list(params["served_models"])}
    for key in SECTIONS:
        value = params[key]
        if value is not None and value != {}:
            doc[key] = value
    doc.update(settings)
    first = [k for k in ORDER if k in doc]
    return {k: doc[k] for k in first + [k for k in doc if k not in ORDER]}


def find_executable(module, name):
    """The ``infernet`` to run, or a CliFailure that says how to get one."""
    if os.sep in name:
        path = name  # type path: ~ and variables already expanded
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise CliFailure(
            f"infernet executable {path} not found or not executable on this host: install "
            "infernet there (the role infernet.node.node, or pip install of its wheel or git URL) "
            "or point executable (infernet_bin) at it"
        )
    found = module.get_bin_path(name)
    if not found:
        raise CliFailure(
            f"infernet executable {name!r} not found on PATH ({os.environ.get('PATH', '')}) on "
            "this host: install infernet there (the role infernet.node.node, or pip install of its "
            "wheel or git URL) or give its full path in "
            "executable (infernet_bin)"
        )
    return found


def error_line(stderr, rc, command, shown_path, real_path):
    """infernet's one-line error: its ``error:`` lines, else its FILE:LINE:COL lines (with the
    temporary file's name replaced by the real one), else the last line it printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if shown_path != real_path:
        lines = [line.replace(shown_path, real_path) for line in lines]
    errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
    if not errors:
        errors = [line for line in lines if line.startswith(real_path + ":")]
    if not errors and lines:
        errors = lines[-1:]
    if not errors:
        return f"infernet {command} failed with exit code {rc} and printed no error"
    return "; ".join(errors)


def plan_errors(errors):
    """The way ``infernet apply`` puts a plan's errors on one line."""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return errors[0] + more


# The line of pip's console script for infernet that names its entry point.
ENTRY_POINT = b"from reconciler.cli import main"


def importable_main(executable):
    """infernet's ``main``, imported here, when ``executable`` is infernet's console script for
    this very interpreter (its ``#!`` names this Python, in this folder): running it in this
    process then does exactly what running it would, without starting a second interpreter and
    importing infernet again in it (most of a no-op task's time). None when it is anything else
    (a wrapper, another virtual environment, another Python) or does not import here: the caller
    then runs it as a subprocess."""
    try:
        with open(executable, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    first = head.split(b"\n", 1)[0]
    if not first.startswith(b"#!") or ENTRY_POINT not in head:
        return None
    words = first[2:].split()
    if len(words) != 1:  # "#!/usr/bin/env python3", or options: not plainly this interpreter
        return None
    interpreter = to_native(words[0])

    def same(a, b):
        return os.path.realpath(a) == os.path.realpath(b)

    mine = sys.executable
    if not mine or not os.path.isabs(interpreter):
        return None
    if not (same(interpreter, mine) and same(os.path.dirname(interpreter), os.path.dirname(mine))):
        return None
    try:
        from reconciler.cli import main as infernet_main
    except Exception:  # not importable here after all (a broken install): the subprocess says why
        return None
    return infernet_main


def run_in_process(main, argv):
    """``main(argv)`` with its output captured: (rc, stdout, stderr), as from the subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors exit, as the subprocess would
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                sys.stderr.write(f"{exc.code}\n")
    return rc, out.getvalue(), err.getvalue()


class Infernet:
    """Runs the CLI with the task's state directory and reads its JSON: in this process when
    the executable is infernet's own console script for this interpreter, else as a
    subprocess."""

    def __init__(self, module, executable, state_dir, config):
        self.module = module
        self.executable = executable
        self.state_dir = state_dir
        self.config = config
        self.main = importable_main(executable)

    def _run(self, command, path, extra=()):
        argv = [command, "--json", *extra, "-c", path]
        if self.state_dir:
            argv += ["--state-dir", self.state_dir]
        if self.main is not None:
            return run_in_process(self.main, argv)
        try:
            return self.module.run_command([self.executable, *argv], check_rc=False)
        except OSError as exc:  # run_command raises for an executable it cannot start
            raise CliFailure(f"cannot run {self.executable}: {to_native(exc)}") from exc

    def plan(self, path):
        """``plan --json`` of ``path``: the document (a plan with errors too), or CliFailure when
        infernet printed none (an invalid file, a crash)."""
        rc, out, err = self._run("plan", path)
        doc = _json_document(out)
        if doc is None:
            raise CliFailure(error_line(err, rc, "plan", path, self.config))
        for key in ("errors", "warnings"):
            doc[key] = [e.replace(path, self.config) for e in doc.get(key, [])]
        return doc

    def apply(self):
        """``apply --json --yes``: the result event, or CliFailure with what it reported."""
        rc, out, err = self._run("apply", self.config, ["--yes"])
        events = [_json_document(line) for line in out.splitlines() if line.strip()]
        result = next((e for e in reversed(events) if e and e.get("event") == "result"), None)
        converged = next((e for e in events if e and e.get("event") == "converged"), None)
        if rc == 0 and (result or converged):
            return result or {"converged": True, "advertised": None, "outcomes": []}
        extra = {}
        if result:
            extra = {k: result[k] for k in ("outcomes", "converged", "advertised") if k in result}
        raise CliFailure(error_line(err, rc, "apply", self.config, self.config), extra)


def _json_document(text):
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def read_text(path):
    """The file's current text, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return ""  # not UTF-8 text: anything we write differs from it


def describe_actions(plan):
    """The plan's actions as the diff's second part, one line each."""
    signs = {"pull": "+", "update": "~", "pin": "^", "unpin": "v", "remove": "-"}
    lines = [
        f"{signs.get(a['op'], '*')} {a['op']} {a['model']} ({a['backend']}): {a['reason']}"
        for a in plan.get("actions", [])
    ]
    if not lines:
        lines = ["No changes. The node matches the file."]
    advertised = ", ".join(plan.get("advertised", [])) or "(nothing)"
    body = "\n".join(lines)
    return f"infernet plan:\n{body}\nAdvertised after apply: {advertised}\n"


def write_temporary(directory, text, prefix):
    """``text`` in a new file in ``directory``; returns its path."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def reconcile(module, result):
    """Everything but argument parsing; fills ``result`` and returns it, or raises CliFailure."""
    params = module.params
    config = result["config_path"]
    try:
        text = render(build_document(params))
    except ValueError as exc:
        raise CliFailure(to_native(exc)) from exc
    if os.path.isdir(config):
        raise CliFailure(f"config {config} is a directory; give the path of the file")
    directory = os.path.dirname(config)
    if not module.check_mode and not os.path.isdir(directory):
        raise CliFailure(f"directory {directory} does not exist; create it first")
    before = read_text(config)
    file_changed = before != text
    executable = find_executable(module, params["executable"])
    state_dir = params["state_dir"]
    if module.check_mode and state_dir and not os.path.exists(state_dir):
        # A node infernet never ran on: plan with an empty state of the same kind rather than
        # let infernet create the state directory.
        state_dir = os.path.join(module.tmpdir, "state")
    cli = Infernet(module, executable, state_dir, config)

    # Plan the file as it will be, before it is put in place: a plan with errors keeps the old one.
    staged = None
    if file_changed:
        where = module.tmpdir if module.check_mode else directory
        staged = write_temporary(where, text, f".{os.path.basename(config)}.")
    try:
        plan = cli.plan(staged or config)
        result.update(
            actions=plan.get("actions", []),
            advertised=plan.get("advertised", []),
            budget=plan.get("budget", {}),
            errors=plan["errors"],
        )
        for warning in plan.get("warnings", []):
            module.warn(warning)
        if plan["errors"]:
            if params["apply"]:
                raise CliFailure(plan_errors(plan["errors"]))
            module.warn(
                "the plan has errors; infernet watch will not apply it until they are fixed: "
                + plan_errors(plan["errors"])
            )
        if staged and not module.check_mode:
            module.atomic_move(staged, config, unsafe_writes=params["unsafe_writes"])
            staged = None
    finally:
        if staged:
            os.unlink(staged)

    file_args = module.load_file_common_arguments(params, path=config)
    attrs_changed = False
    if os.path.exists(config) or not module.check_mode:
        attrs_changed = module.set_fs_attributes_if_different(file_args, False)
    if module._diff:
        result["diff"] = [
            {
                "before": before or "",
                "after": text,
                "before_header": config,
                "after_header": config,
            },
            {"prepared": describe_actions(plan)},
        ]
    written = file_changed or attrs_changed
    if not params["apply"]:
        result["changed"] = written
    elif module.check_mode:
        result["changed"] = written or bool(result["actions"])
    elif not result["actions"] and not file_changed:
        result["changed"] = written
    else:
        run_apply(cli, result, written)
    return result


def run_apply(cli, result, written):
    """Apply and fold its outcome into ``result``; changed when the file or the node changed."""
    try:
        applied = cli.apply()
    except CliFailure as failure:
        outcomes = failure.extra.get("outcomes", [])
        done = any(o.get("result") == "ok" for o in outcomes)
        result["changed"] = written or done
        raise
    result["outcomes"] = applied.get("outcomes", [])
    result["converged"] = bool(applied.get("converged"))
    if applied.get("advertised") is not None:
        result["advertised"] = applied["advertised"]
    result["changed"] = written or bool(result["outcomes"])


# The task's options (the file's owner, group and mode come from add_file_common_args).
ARGUMENT_SPEC = {
    "served_models": {"type": "list", "elements": "raw", "required": True},
    "default_backend": {"type": "str"},
    "backends": {"type": "dict"},
    "budget": {"type": "dict"},
    "control_plane": {"type": "dict"},
    "policy": {"type": "dict"},
    "settings": {"type": "dict", "default": {}},
    "config": {"type": "path", "default": DEFAULT_CONFIG, "aliases": ["path"]},
    "state_dir": {"type": "path"},
    "executable": {"type": "path", "default": "infernet", "aliases": ["infernet_bin"]},
    "apply": {"type": "bool", "default": True},
    "mode": {"type": "raw", "default": "0644"},
}


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        add_file_common_args=True,
        supports_check_mode=True,
    )
    result = {"changed": False, "config_path": os.path.abspath(module.params["config"])}
    try:
        reconcile(module, result)
    except CliFailure as exc:
        result.update(exc.extra)
        module.fail_json(msg=exc.msg, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
