"""What each step of a switch costs a model, per sleep depth: the simulator's `--costs FILE`.

A switch is its victims' sleeps, one after another, then the target's wake, and with vLLM's
sleep mode the depth decides most of it: level 1 copies the weights to host RAM (a slow sleep,
a fast wake, the RAM held while asleep), level 2 drops them (a fast sleep, a slow wake that
reloads them). A model's very first wake is a cold start: its server loads from nothing.

The file is TOML: `[default]` for every model, `[models.NAME]` to override some of its figures.

    name = "A"
    source = "where the figures come from"
    [default]
    sleep = { 1 = 10.57, 2 = 0.31 }   # seconds, per level
    wake = { 1 = 2.19, 2 = 6.53 }     # seconds, from a sleep at that level
    cold_start = 48.0                 # seconds: the server's first start
    weights_gb = 22.0                 # host RAM a level-1 sleep holds

Profiles A and B of measured 8B-class models ship with llmux (`profile_path`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

LEVELS = (1, 2)
PROFILES = ("A", "B")
MOST = 1e6  # seconds or GiB: beyond this a figure is a typo, and would stall the simulation


class CostsFileError(ValueError):
    """The costs file is not what the format above says; the message names the key."""


@dataclass(frozen=True)
class StepCosts:
    """One model's figures."""

    sleep: dict[int, float]
    wake: dict[int, float]
    cold_start: float
    weights_gb: float


@dataclass(frozen=True)
class TierCosts:
    name: str
    source: str
    default: StepCosts
    models: dict[str, StepCosts] = field(default_factory=dict)

    def of(self, model: str) -> StepCosts:
        return self.models.get(model, self.default)


def profile_path(name: str) -> Path:
    """A shipped profile's file (`A` or `B`)."""
    return Path(__file__).parent / "data" / "costs" / f"profile-{name.lower()}.toml"


def load_costs(spec: str | Path) -> TierCosts:
    """A costs file, or the name of a shipped profile."""
    path = profile_path(str(spec)) if str(spec).upper() in PROFILES else Path(spec)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CostsFileError(f"cannot read costs file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CostsFileError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CostsFileError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(raw) - {"name", "source", "default", "models"}
    if unknown:
        raise CostsFileError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    if "default" not in raw:
        raise CostsFileError(f"{path}: no [default] table (sleep, wake, cold_start, weights_gb)")
    default = _step_costs(raw["default"], None, f"{path}: default")
    tables = raw.get("models", {})
    if not isinstance(tables, dict):
        raise CostsFileError(f"{path}: models: [models.NAME] tables are expected")
    models = {
        name: _step_costs(table, default, f"{path}: models.{name}")
        for name, table in tables.items()
    }
    return TierCosts(str(raw.get("name", path.stem)), str(raw.get("source", "")), default, models)


def _step_costs(table: object, base: StepCosts | None, where: str) -> StepCosts:
    if not isinstance(table, dict):
        raise CostsFileError(f"{where}: a table is expected")
    unknown = set(table) - {"sleep", "wake", "cold_start", "weights_gb"}
    if unknown:
        raise CostsFileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    values: dict[str, object] = {}
    for key in ("sleep", "wake"):
        if key in table:
            values[key] = _per_level(table[key], f"{where}.{key}")
        elif base is None:
            raise CostsFileError(f"{where}: {key} = {{ 1 = SECONDS, 2 = SECONDS }} is missing")
    for key in ("cold_start", "weights_gb"):
        if key in table:
            values[key] = _seconds(table[key], f"{where}.{key}")
        elif base is None:
            raise CostsFileError(f"{where}: {key} is missing")
    if base is None:
        return StepCosts(**values)  # type: ignore[arg-type]
    return replace(base, **values)


def _per_level(table: object, where: str) -> dict[int, float]:
    if not isinstance(table, dict) or sorted(table) != ["1", "2"]:
        raise CostsFileError(f"{where}: {{ 1 = SECONDS, 2 = SECONDS }} is expected")
    return {int(level): _seconds(value, f"{where}.{level}") for level, value in table.items()}


def _seconds(value: object, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MOST
    ):
        raise CostsFileError(f"{where}: a number from 0 to {MOST:g} is expected, not {value!r}")
    return float(value)
