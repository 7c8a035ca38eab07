"""What `llmux check` looks at beyond parsing: that each hook's program can run at all.

Parsing already refuses a script named by path that does not exist. Here, for `llmux check` only
(a hook may be installed after a reload is validated), each hook's first word is looked up the
way `sh -c` will: a builtin, a path relative to the hook folder (it must be executable), or a
command on PATH; for `sh`/`bash`/`python` the script they are given must exist too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmux.config import Config, ConfigError
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
    """One error per hook (or `cmd`) whose program or script will not be found or cannot run."""
    problems = []
    for name, model in config.models.items():
        for key in _COMMAND_KEYS:
            command = getattr(model, key)
            if command is None:
                continue
            problem = _problem(command, config.hook_dir)
            if problem:
                problems.append(ConfigError(config.path, f"models.{name}.{key}", problem))
    return problems


def _problem(command: str, hook_dir: Path) -> str | None:
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
        path = hook_dir / program
        if not path.is_file():
            return f"{program} not found (looked at {path})"
        if not os.access(path, os.X_OK):
            return f"{program} is not executable (chmod +x {path})"
    elif shutil.which(program) is None:
        return f"{program!r} is not a shell builtin and is not on PATH ({os.environ.get('PATH')})"
    if Path(program).name in _INTERPRETERS:
        script = _script_of(words[1:])
        if script is not None and not (hook_dir / script).is_file():
            path = hook_dir / script
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
