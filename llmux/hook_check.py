"""What `llmux check` looks at beyond parsing: that each hook's program can run at all, and
that it is given the model's port and name the way llmux passes them.

Parsing already refuses a script named by path that does not exist. Here each hook's first word
is looked up the way `sh -c` will: a builtin, a path relative to the hook folder (it must be
executable), or a command on PATH; for `sh`/`bash`/`python` the script they are given must exist
too. `llmux check` refuses a config with any of these problems, all of them listed at once;
`llmux serve` only warns of them, since a program may appear after llmux starts (a venv
installed later, a mount not up yet) and a server that cannot start fails its wake anyway.

The placeholders: llmux writes the port and name into a `cmd` where it says `${PORT}` and
`${MODEL}` (braces and `$` both), and gives hooks `$LLMUX_PORT` and `$LLMUX_MODEL` in their
environment. Anything else (`{PORT}`, `$PORT`, or `${PORT}` in a hook) reaches the program as
the text itself or as an empty string, and the mistake shows only at the first request.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from llmux.config import Config, ConfigError, quote_name
from llmux.config_checker import hook_words
from llmux.core.states import HookName

# POSIX sh builtins and keywords a hook may start with; they are never looked up on PATH.
_SHELL_WORDS = {
    ":",
    ".",
    "[",
    "alias",
    "bg",
    "break",
    "cd",
    "command",
    "continue",
    "echo",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fg",
    "getopts",
    "hash",
    "jobs",
    "kill",
    "printf",
    "pwd",
    "read",
    "readonly",
    "return",
    "set",
    "shift",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "case",
    "esac",
    "for",
    "while",
    "until",
    "do",
    "done",
    "{",
    "}",
    "!",
    "(",
    ")",
}
_INTERPRETERS = {"sh", "bash", "dash", "zsh", "python", "python3"}


# The keys of a model that hold a command line run by `sh -c` in the hook folder.
_COMMAND_KEYS = (*(hook.value for hook in HookName), "cmd")


def hook_problems(config: Config) -> list[ConfigError]:
    """Every problem of every model's hooks and `cmd`, in the file's order: one look shows
    all there is to mend."""
    problems = []
    for name, model in config.models.items():
        for key in _COMMAND_KEYS:
            command = getattr(model, key)
            if command is None:
                continue
            found = [
                _looked_at(command, config.hook_dir),
                *_placeholder_problems(command, key),
            ]
            if key == "cmd" and model.port_chosen:
                found.append(_chosen_port_problem(command))
            where = f"models.{quote_name(name)}.{key}"
            problems += [ConfigError(config.path, where, problem) for problem in found if problem]
    return problems


# `${PORT}`, `{PORT}` (no `$`) and `$PORT` (no braces); the same for MODEL.
_PLACEHOLDER = re.compile(r"\$\{(PORT|MODEL)\}|(?<!\$)\{(PORT|MODEL)\}|\$(PORT|MODEL)(?!\w)")
_MEANS = {"PORT": "the port", "MODEL": "the model's name"}


def _placeholder_problems(command: str, key: str) -> list[str]:
    """The port or name written in a way llmux does not fill in (see the module's docstring)."""
    problems = []
    for written in dict.fromkeys(m.group(0) for m in _PLACEHOLDER.finditer(command)):
        word = written.strip("${}")
        right = f"${{{word}}}" if key == "cmd" else f"${{LLMUX_{word}}}"
        if written == right:
            continue
        if not written.startswith("$"):
            why = f"reaches the program as written, not as {_MEANS[word]}"
        elif re.search(rf"(?<!\w){word}=", command):
            continue  # a shell variable the command sets itself
        elif key == "cmd":
            why = "is a shell variable, empty unless llmux's environment has it"
        else:
            why = "is empty in a hook, unless llmux's environment has it (only `cmd` gets it)"
        problems.append(f"{written} {why}; write {right}")
    return problems


def _chosen_port_problem(command: str) -> str | None:
    """A `cmd` with no `port`: llmux chooses one, which the command must be given."""
    written = {m.group(0).strip("${}") for m in _PLACEHOLDER.finditer(command)}
    if "PORT" in written or "LLMUX_PORT" in command:
        return None  # given, or given wrong: that has its own problem
    return (
        "no port is given, so llmux chooses one, but the command never says ${PORT}: its "
        "server would listen elsewhere and never be ready; add --port ${PORT} (or set port)"
    )


def _looked_at(command: str, hook_dir: Path) -> str | None:
    """The program's problem; a path that cannot be looked at (no permission to enter its
    folder, a loop of links, a name too long) is one too, not a crash."""
    try:
        return _program_problem(command, hook_dir)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of symlinks (resolve)
        return f"cannot look at its program: {exc}"


def _program_problem(command: str, hook_dir: Path) -> str | None:
    try:
        words = hook_words(command)
    except ValueError:
        return None  # parsing refused these already
    if not words:
        return None
    program = words[0].rstrip(";&|")
    if not program or program in _SHELL_WORDS:
        return None
    if "/" in program:
        path = (hook_dir / program).resolve()
        if not path.is_file():
            return f"{program} not found (looked at {path})"
        if not os.access(path, os.X_OK):
            return f"{program} is not executable (chmod +x {path})"
    elif shutil.which(program) is None:
        return f"{program!r} is not a shell builtin and is not on PATH ({os.environ.get('PATH')})"
    if Path(program).name in _INTERPRETERS:
        script = _script_of(words[1:])
        path = (hook_dir / script).resolve() if script is not None else None
        if path is not None and not path.is_file():
            return f"{program} is given {script}, which is not found (looked at {path})"
    return None


def _script_of(arguments: list[str]) -> str | None:
    """The script an interpreter runs, or None when it runs a command string (`-c`) or a
    module (`-m`)."""
    for word in arguments:
        if word.startswith("-"):
            if word != "--" and ("c" in word[1:] or "m" in word[1:]):
                return None
            continue
        return word
    return None
