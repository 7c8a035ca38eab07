"""Checks of config values that word each problem for the person who wrote the file (file,
dotted key, what was expected) and keep going, so that one run of `llmux check` names every
problem of a file, not only the first."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmux.config_keys import NON_NEGATIVE, NUMBER, PORT, POSITIVE, KeySpec

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class ConfigError(Exception):
    """A config problem, worded for the person who wrote the file. One raised for several
    problems holds them all in `problems` and says each on its own line."""

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        self.problems: list[ConfigError] = [self]
        self.partial: Any = None  # the Config of what did parse, when there is one
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + problem)

    @classmethod
    def of(cls, problems: list[ConfigError]) -> ConfigError:
        """One error for all of `problems` (the first's text leads, the others follow)."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        rest = "".join(f"\n{p}" for p in problems[1:])
        error = cls(first.path, first.key, f"{first.problem}{rest}")
        error.problems = list(problems)
        return error


class Checker:
    """Validators that name the file and key; `section` records a problem and goes on."""

    def __init__(self, path: Path, top_keys: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.top_keys = top_keys  # keys of the top level: one found in a table was misplaced
        self.problems: list[ConfigError] = []

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    @contextmanager
    def section(self) -> Iterator[None]:
        """Run one part of the file's checks; a problem there is kept and the next part runs."""
        try:
            yield
        except ConfigError as exc:
            self.problems.extend(exc.problems)

    def table(self, value: Any, key: str, allowed: dict[str, Any]) -> dict[str, Any]:
        """The entries of a table whose keys are known and types right; each other entry is a
        problem kept (not raised), so that the rest of the table is still checked."""
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        good = {}
        for name, item in value.items():
            full = f"{key}.{shown_key(name)}" if key else shown_key(name)
            if name not in allowed:
                self.problems.append(self.error(full, self._unknown(key, name, item, allowed)))
                continue
            expected = allowed[name]
            if not is_type(item, expected):
                got = type_name(type(item))
                self.problems.append(self.error(full, f"must be {type_name(expected)}, got {got}"))
                continue
            good[name] = item
        return good

    def _unknown(self, key: str, name: str, item: Any, allowed: dict[str, Any]) -> str:
        if isinstance(item, dict) and key.startswith("models."):
            model = key.removeprefix("models.")
            return f'a model name with dots must be quoted: [models."{model}.{name}"]'
        if key and name in self.top_keys and not isinstance(item, dict):
            return (
                f"{name} is a top-level key: write it above the first [table] header (TOML "
                f"puts a key into the table whose header comes before it, here [{key}])"
            )
        hint = ", ".join(sorted(allowed))
        return f"unknown key (known here: {hint})"

    def spec(self, spec: KeySpec, value: Any, key: str) -> Any:
        """`value` checked by its declaration's rule, choices and length."""
        if spec.rule == POSITIVE:
            return self.positive(value, key)
        if spec.rule == NON_NEGATIVE:
            return self.non_negative(value, key)
        if spec.rule == PORT:
            return self.port(value, key)
        if isinstance(value, str) and "\0" in value:
            raise self.error(key, "cannot hold a NUL character")
        if spec.min_length and len(value) < spec.min_length:
            raise self.error(key, f"must be at least {spec.min_length} characters")
        if spec.items is not None:
            expected = type_name(spec.items)
            wrong = [
                self.error(f"{key}[{index}]", f"must be {expected}, got {type_name(type(item))}")
                for index, item in enumerate(value)
                if not is_type(item, spec.items)
            ]
            if wrong:
                raise ConfigError.of(wrong)
        return value

    def port(self, value: Any, key: str) -> int:
        if not is_type(value, int) or not 0 < value < 65536:
            raise self.error(key, f"must be a port number 1-65535, got {_shown(value)}")
        return value

    def positive(self, value: Any, key: str) -> Any:
        if not _finite(value) or value <= 0:
            raise self.error(key, f"must be a positive number, got {_shown(value)}")
        return value

    def non_negative(self, value: Any, key: str) -> Any:
        if not _finite(value) or value < 0:
            raise self.error(key, f"must be zero or a positive number, got {_shown(value)}")
        return value

    def hook(self, command: str, key: str) -> None:
        """Reject empty hooks and scripts named by path that do not exist next to the config."""
        if not command.strip():
            raise self.error(key, "empty hook command")
        try:
            words = hook_words(command)
        except ValueError as exc:
            raise self.error(key, f"cannot parse shell command: {exc}") from None
        program = words[0] if words else ""
        if "\0" in command:
            raise self.error(key, "a hook command cannot hold a NUL character")
        if "/" in program:
            try:
                script = (self.path.parent / program).resolve()
                found = script.exists()
            except OSError as exc:
                raise self.error(key, f"cannot look at {program}: {exc}") from None
            if not found:
                raise self.error(key, f"hook script {program} not found (looked at {script})")


def _finite(value: Any) -> bool:
    """A number that is finite as a float too: every number llmux reads ends up as one (an
    integer of 400 digits is no timeout)."""
    if not is_type(value, NUMBER):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def shown_key(name: str) -> str:
    """A key as an error shows it: quoted when it holds what would break the line."""
    return (
        name
        if name.isprintable() and name.strip() == name and name
        else json.dumps(name, ensure_ascii=False)
    )


def hook_words(command: str) -> list[str]:
    """A hook's words from its program on: leading `NAME=value` assignments are skipped
    (`MODEL=/m.gguf ./start.sh` runs ./start.sh). ValueError if the shell could not parse it."""
    words = shlex.split(command, comments=True)
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def is_type(value: Any, expected: Any) -> bool:
    """bool is checked before int because TOML booleans are Python ints."""
    if isinstance(value, bool):
        return expected is bool or (isinstance(expected, tuple) and bool in expected)
    return isinstance(value, expected)


def type_name(expected: Any) -> str:
    if expected == (int, str):
        return "an integer or a string"
    if isinstance(expected, tuple):
        return "a number"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
        list: "an array",
    }.get(expected, getattr(expected, "__name__", str(expected)))
