"""``infernet completion bash|zsh|fish``: shell-completion scripts made from the parser itself.

The scripts are generated from argparse's own structure (commands, sub-commands, flags, their
choices and metavars), so a flag added to ``parser.py`` is completed without touching this
module. Model names are completed from the file, at completion time: the script runs
``infernet completion SHELL --models [-c FILE]``, which prints the names ``served_models``
lists, one a line (the ``-c`` given on the command line being completed is passed on).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

# Positionals that take a model name, completed from the names the file lists (paths that
# the parser doesn't have are ignored).
MODEL_NAME_ARGS = frozenset({"model remove", "adopt", "state show", "state forget"})
# Metavars whose values are paths.
_FILE_METAVARS = frozenset({"FILE", "PLAN"})
_DIR_METAVARS = frozenset({"DIR"})


@dataclass(frozen=True)
class Option:
    """One flag of one command: its spellings, help, and what its value is."""

    flags: tuple[str, ...]
    help: str
    value: str | None  # None = a switch; "file", "dir", "choice" or "text"
    choices: tuple[str, ...] = ()


@dataclass
class Command:
    """One command path (``""`` for ``infernet`` itself, ``"model remove"``)."""

    path: str
    subcommands: dict[str, str] = field(default_factory=dict)  # name -> help
    options: list[Option] = field(default_factory=list)
    positional: str | None = None  # "models", "file", "choice" or None
    choices: tuple[str, ...] = ()  # the positional's choices


def commands(parser: argparse.ArgumentParser, path: str = "") -> list[Command]:
    """Every command path of ``parser``, depth first."""
    here = Command(path)
    found = [here]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                here.subcommands[name] = helps.get(name, "")
                found += commands(sub, f"{path} {name}".strip())
        elif action.help == argparse.SUPPRESS:
            continue
        elif action.option_strings:
            here.options.append(_option(action))
        elif path in MODEL_NAME_ARGS:
            here.positional = "models"
        elif action.choices is not None:
            here.positional, here.choices = "choice", tuple(str(c) for c in action.choices)
        elif action.metavar in _FILE_METAVARS:
            here.positional = "file"
    return found


def _option(action: argparse.Action) -> Option:
    flags = tuple(action.option_strings)
    text = _help(action)
    if action.nargs == 0:
        return Option(flags, text, None)
    if action.choices is not None:
        return Option(flags, text, "choice", tuple(str(c) for c in action.choices))
    if action.metavar in _FILE_METAVARS:
        return Option(flags, text, "file")
    if action.metavar in _DIR_METAVARS:
        return Option(flags, text, "dir")
    return Option(flags, text, "text")


def _help(action: argparse.Action) -> str:
    """The help line as ``--help`` shows it (``%(choices)s`` filled in), on one line."""
    text = action.help or ""
    if "%(" in text:
        choices = ", ".join(str(c) for c in action.choices or ())
        text = text.replace("%(choices)s", choices).replace("%(default)s", str(action.default))
    return " ".join(text.replace("%%", "%").split())


def model_names(config: str | None) -> list[str]:
    """The names ``served_models`` lists in the file ``-c``/the search path finds; none when
    there is no valid file (a completion must never print an error into a prompt)."""
    from reconciler.config import desired
    from reconciler.errors import InfernetError

    try:
        return [m.name for m in desired.load(desired.locate(config)).models]
    except InfernetError:
        return []


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash, zsh or fish)."""
    tree = commands(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](tree, parser.prog)


# --------------------------------------------------------------------------- shared pieces


def _q(word: str) -> str:
    return shlex.quote(word)


def _value_flags(tree: list[Command]) -> list[str]:
    """Flags that take a value anywhere: the word after them is never a command name."""
    return sorted({f for c in tree for o in c.options if o.value for f in o.flags})


def _path_patterns(tree: list[Command]) -> str:
    """``"/plan"|"model/list"|…``: the parent path and a word that together make a path."""
    pairs = [f'"{c.path}/{sub}"' for c in tree for sub in c.subcommands]
    return "|".join(pairs)


def _scan(tree: list[Command], words: str, first: int) -> str:
    """Shell lines (bash and zsh alike) walking the words before the cursor (``cword``):
    the command path typed so far into ``cmd``, a ``-c`` value into ``config``."""
    others = "|".join(f for f in _value_flags(tree) if f not in ("-c", "--config"))
    return f"""    local cmd="" config="" i w
    for (( i = {first}; i < cword; i++ )); do
        w="${{{words}[i]}}"
        case "$w" in
            (-c|--config) config="${{{words}[i+1]}}"; (( i++ )); continue ;;
            (--config=*) config="${{w#--config=}}"; continue ;;
            ({others}) (( i++ )); continue ;;
            (-*) continue ;;
        esac
        case "$cmd/$w" in
            ({_path_patterns(tree)}) cmd="${{cmd:+$cmd }}$w" ;;
        esac
    done
    config="${{config/#\\~/$HOME}}"
"""


def _case(entries: list[tuple[str, str]], indent: str = "        ") -> str:
    """``case`` arms (bash and zsh accept ``(pattern) body ;;``)."""
    return "".join(f"{indent}({pattern}) {body} ;;\n" for pattern, body in entries)


# --------------------------------------------------------------------------- bash


def _bash(tree: list[Command], prog: str) -> str:
    values: list[tuple[str, str]] = []
    for c in tree:
        for o in c.options:
            if o.value is None:
                continue
            pattern = "|".join(f'"{c.path}|{f}"' for f in o.flags)
            reply = {
                "file": 'compopt -o filenames; COMPREPLY=( $(compgen -f -- "$cur") ); return',
                "dir": 'compopt -o filenames; COMPREPLY=( $(compgen -d -- "$cur") ); return',
                "choice": f'COMPREPLY=( $(compgen -W {_q(" ".join(o.choices))} -- "$cur") ); '
                "return",
                "text": "return",
            }[o.value]
            values.append((pattern, reply))
    flags = [
        (f'"{c.path}"', f"words={_q(' '.join(f for o in c.options for f in o.flags))}")
        for c in tree
    ]
    words: list[tuple[str, str]] = []
    for c in tree:
        if c.subcommands:
            words.append((f'"{c.path}"', f"words={_q(' '.join(c.subcommands))}"))
        elif c.positional == "models":
            words.append(
                (
                    f'"{c.path}"',
                    f'words="$({prog} completion bash --models '
                    '${config:+-c "$config"} 2>/dev/null)"',
                )
            )
        elif c.positional == "choice":
            words.append((f'"{c.path}"', f"words={_q(' '.join(c.choices))}"))
        elif c.positional == "file":
            words.append(
                (
                    f'"{c.path}"',
                    'compopt -o filenames; COMPREPLY=( $(compgen -f -- "$cur") ); return',
                )
            )
    return f"""# bash completion for {prog}: generated by `{prog} completion bash`.
# Load it with: source <({prog} completion bash)
_{prog}() {{
    local cword=$COMP_CWORD cur prev="" words=""
    # The word being completed as typed: COMP_WORDS splits model names at ':'.
    cur="${{COMP_LINE:0:COMP_POINT}}"
    cur="${{cur##*[[:space:]]}}"
    (( cword > 0 )) && prev="${{COMP_WORDS[cword-1]}}"
{_scan(tree, "COMP_WORDS", 1)}    case "$cmd|$prev" in
{_case(values)}    esac
    if [[ "$cur" == -* ]]; then
        case "$cmd" in
{_case(flags, "            ")}        esac
    else
        case "$cmd" in
{_case(words, "            ")}        esac
    fi
    local IFS=$'\\n'
    COMPREPLY=( $(compgen -W "${{words//[[:space:]]/$'\\n'}}" -- "$cur") )
    # Readline replaces only what follows the last ':' of the word (COMP_WORDBREAKS).
    if [[ "$cur" == *:* ]]; then
        local prefix="${{cur%"${{cur##*:}}"}}" k
        for k in "${{!COMPREPLY[@]}}"; do
            COMPREPLY[k]="${{COMPREPLY[k]#"$prefix"}}"
        done
    fi
}}
complete -F _{prog} {prog}
"""


# --------------------------------------------------------------------------- zsh


def _zsh(tree: list[Command], prog: str) -> str:
    values: list[tuple[str, str]] = []
    for c in tree:
        for o in c.options:
            if o.value is None:
                continue
            pattern = "|".join(f'"{c.path}|{f}"' for f in o.flags)
            reply = {
                "file": "_files; return",
                "dir": "_directories; return",
                "choice": f"compadd -- {' '.join(_q(x) for x in o.choices)}; return",
                "text": "_message 'value'; return",
            }[o.value]
            values.append((pattern, reply))
    flags: list[tuple[str, str]] = []
    for c in tree:
        described = " ".join(_q(_zsh_item(f, o.help)) for o in c.options for f in o.flags)
        flags.append((f'"{c.path}"', f"items=( {described} ); _describe -t options option items"))
    words: list[tuple[str, str]] = []
    for c in tree:
        if c.subcommands:
            described = " ".join(_q(_zsh_item(n, h)) for n, h in c.subcommands.items())
            words.append(
                (f'"{c.path}"', f"items=( {described} ); _describe -t commands command items")
            )
        elif c.positional == "models":
            words.append(
                (
                    f'"{c.path}"',
                    # zsh splits no parameter expansion: -c and the path are two words here.
                    f'items=( ${{(f)"$({prog} completion zsh --models '
                    '${config:+-c} $config 2>/dev/null)"} ); compadd -- $items',
                )
            )
        elif c.positional == "choice":
            words.append((f'"{c.path}"', f"compadd -- {' '.join(_q(x) for x in c.choices)}"))
        elif c.positional == "file":
            words.append((f'"{c.path}"', "_files"))
    return f"""#compdef {prog}
# zsh completion for {prog}: generated by `{prog} completion zsh`.
# Load it with: source <({prog} completion zsh) (after compinit), or save it as _{prog}
# in a folder of $fpath.
_{prog}() {{
    local cword=$CURRENT cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}"
    local -a items
{_scan(tree, "words", 2)}    case "$cmd|$prev" in
{_case(values)}    esac
    if [[ "$cur" == -* ]]; then
        case "$cmd" in
{_case(flags, "            ")}        esac
    else
        case "$cmd" in
{_case(words, "            ")}        esac
    fi
}}
if [[ "$funcstack[1]" == "_{prog}" ]]; then
    _{prog} "$@"
else
    compdef _{prog} {prog}
fi
"""


def _zsh_item(name: str, text: str) -> str:
    """``name:description`` for ``_describe`` (a ':' in the name is escaped)."""
    return f"{name.replace(':', chr(92) + ':')}:{text}"


# --------------------------------------------------------------------------- fish


def _fish(tree: list[Command], prog: str) -> str:
    value_flags = " ".join(_value_flags(tree))
    paths = " ".join(_q(pattern.strip('"')) for pattern in _path_patterns(tree).split("|"))
    lines = [
        f"# fish completion for {prog}: generated by `{prog} completion fish`.",
        f"# Load it with: {prog} completion fish | source",
        f"function __{prog}_cmd --description 'the {prog} command path typed so far'",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l cmd ''",
        "    set -l skip 0",
        "    for w in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        f"        if contains -- $w {value_flags}",
        "            set skip 1",
        "            continue",
        "        end",
        "        if string match -q -- '-*' $w",
        "            continue",
        "        end",
        f'        if contains -- "$cmd/$w" {paths}',
        '            set cmd (string trim -- "$cmd $w")',
        "        end",
        "    end",
        "    echo $cmd",
        "end",
        f"function __{prog}_at --description 'the command path typed so far is $argv[1]'",
        f"    set -l cmd (__{prog}_cmd)",
        '    test "$cmd" = "$argv[1]"',
        "end",
        f"function __{prog}_models --description 'the model names the file lists'",
        "    set -l words (commandline -opc)",
        "    set -l config",
        "    for i in (seq (count $words))",
        "        if contains -- $words[$i] -c --config",
        "            set config -c $words[(math $i + 1)]",
        "        end",
        "    end",
        f"    {prog} completion fish --models $config 2>/dev/null",
        "end",
        f"complete -c {prog} -f",
    ]
    for c in tree:
        at = f"-n \"__{prog}_at '{c.path}'\""  # paths are words of [a-z-]
        for name, text in c.subcommands.items():
            lines.append(f"complete -c {prog} {at} -a {_q(name)} -d {_q(text)}")
        if c.positional == "models":
            lines.append(f"complete -c {prog} {at} -a '(__{prog}_models)'")
        elif c.positional == "choice":
            lines.append(f"complete -c {prog} {at} -a {_q(' '.join(c.choices))}")
        elif c.positional == "file":
            lines.append(f"complete -c {prog} {at} -F")
        for o in c.options:
            spell = " ".join(
                f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in o.flags
            )
            takes = {
                None: "",
                "file": " -r -F",
                "dir": " -x -a '(__fish_complete_directories)'",
                "choice": f" -x -a {_q(' '.join(o.choices))}",
                "text": " -x",
            }[o.value]
            lines.append(f"complete -c {prog} {at} {spell}{takes} -d {_q(o.help)}")
    return "\n".join(lines) + "\n"


__all__ = ["MODEL_NAME_ARGS", "Command", "Option", "commands", "model_names", "script"]
