"""Read and validate the TOML config once, into frozen dataclasses: nothing else sees raw dicts.

Every error names the file, the dotted key and what is wrong, so `llmux check` and `llmux serve`
can refuse a bad file before anything binds a port.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmux.core.states import HookName
from llmux.errors import InvalidPath
from llmux.request_target import check_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
DEFAULT_GROUP = "default"  # the group of every model no [groups.NAME] table lists


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class ConfigError(Exception):
    """A config problem, worded for the person who wrote the file."""

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + problem)


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One data-plane process per core, up to 8 (the controller is one more, mostly idle)."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class ServerConfig:
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_timeout_secs: float = 30.0
    expose_hook_errors: bool = True  # default: on, unless [auth] api_keys are set
    access_log: bool = True
    max_queue_per_model: int = 256
    max_in_flight_per_model: int | None = None  # None: no limit
    request_head_timeout_secs: float = 75.0  # also how long an idle keep-alive connection lives
    request_body_timeout_secs: float = 60.0
    max_header_bytes: int = 16 * 1024
    state_dir: str | None = None  # llmux's locks and hook record; see state_dir
    client_send_timeout_secs: float = 60.0  # a client that takes nothing this long is cut
    max_connections: int = 4096  # beyond it, new connections get 503 and are closed
    listen_backlog: int = 2048  # connections the kernel queues before llmux accepts them
    # Data-plane processes beside the controller (`llmux serve` only); 1: one process.
    workers: int = field(default_factory=lambda: default_workers())
    list_aliases: bool = False  # /v1/models lists aliases beside the models they name
    # GiB the check of room before a switch's wake leaves free on each GPU of the group beyond
    # what the model takes (CUDA context, buffers).
    gpu_margin_gb: float = 1.0


@dataclass(frozen=True)
class AuthConfig:
    api_keys: tuple[str, ...] = ()  # inline keys plus those of api_keys_file
    public_metrics: bool = False  # with api_keys: may /metrics be read without a key?
    public_status: bool = False  # likewise for /llmux/status
    admin_token: str | None = None  # the admin API is served only when this is set

    @property
    def required(self) -> bool:
        return bool(self.api_keys)


# The built-in policy that won the trace replays (README, "Switch policies").
DEFAULT_POLICY = "adaptive"


@dataclass(frozen=True)
class MachineConfig:
    """The box itself, beside its GPUs: the host RAM llmux may fill with the weights of models
    asleep at level 1 (vLLM keeps them in host RAM to wake fast); None: the machine's RAM less
    a reserve for the system (runtime/machine.py)."""

    ram_gb: float | None = None


@dataclass(frozen=True)
class PolicyConfig:
    name: str = DEFAULT_POLICY
    request_timeout_secs: float | None = None
    drain_before_switch: bool = True
    min_active_secs: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


_NUMBER = (int, float)

KINDS = ("vllm", "sglang", "ollama")  # engines whose sleep/wake API llmux drives itself
READY_PATHS = {"ollama": "/api/version"}  # where a server's readiness is asked, if not /health
SLEEP_LEVELS = (1, 2)


def _key(toml: Any, default: Any = MISSING, *, inherited: str | None = None) -> Any:
    """A per-model key, declared once: its TOML type(s) and default; `inherited` ("positive"
    or "non_negative") also lets [defaults] set it, checked so."""
    return field(default=default, metadata={"toml": toml, "inherited": inherited})


@dataclass(frozen=True)
class ModelConfig:
    """One [models.NAME] table. Each field declared with `_key` is a key of that table; the
    parser, its known-keys check and [defaults] are derived from these declarations."""

    name: str
    port: int = _key(int, 0)  # required unless `cmd` is set (then a free one is chosen)
    # Shell hooks, or a built-in driver (`kind`, `cmd`): a model uses one or the other.
    wake: str | None = _key(str, None)
    sleep: str | None = _key(str, None)
    alive: str | None = _key(str, None)
    kind: str | None = _key(str, None)  # "vllm", "sglang", "ollama": llmux calls its API
    cmd: str | None = _key(str, None)  # a server llmux starts itself (${PORT}, ${MODEL})
    # vLLM: 1 offloads weights to CPU RAM, 2 discards them; "auto" (auto_sleep_level): chosen
    # at each sleep, `sleep_level` then being the level assumed before the first choice.
    sleep_level: int = _key((int, str), 1)
    auto_sleep_level: bool = False
    # The host RAM a level-1 sleep holds (the weights): measured where llmux can, else this.
    weights_gb: float | None = _key(_NUMBER, None)
    health_path: str | None = _key(str, None)  # ready when 200 (default per kind: READY_PATHS)
    wake_timeout_secs: float = _key(_NUMBER, 600.0, inherited="positive")
    sleep_timeout_secs: float = _key(_NUMBER, 120.0, inherited="positive")
    alive_timeout_secs: float = _key(_NUMBER, 10.0, inherited="positive")
    alive_interval_secs: float = _key(_NUMBER, 10.0, inherited="positive")
    # The backend's answer: its first byte within this (vLLM sends a non-streamed answer's
    # first byte only when generation ends), then no gap longer than idle_timeout_secs.
    first_byte_timeout_secs: float = _key(_NUMBER, 600.0, inherited="positive")
    idle_timeout_secs: float = _key(_NUMBER, 300.0, inherited="positive")
    # Idle this long while awake: put to sleep (0: never).
    ttl_secs: float = _key(_NUMBER, 0.0, inherited="non_negative")
    # What it takes of its group's capacity, given as memory_gb or size (see SIZE_KEYS).
    size: float | None = _key(_NUMBER, None)
    size_in_gib: bool = False  # given as memory_gb: GiB, which the GPU check compares with
    aliases: tuple[str, ...] = _key(list, ())  # other names clients may use for it
    upstream_model: str | None = _key(str, None)  # the `model` the backend is sent, if not `name`
    # Backend paths outside the route table that clients may reach as /upstream/NAME/PATH.
    passthrough_paths: tuple[str, ...] = _key(list, ())
    backend_api_key: str | None = _key(str, None)  # sent to the backend as its bearer token
    group: str = DEFAULT_GROUP  # set from [groups], not a key of the model's table
    port_chosen: bool = False  # no port was given: llmux chose a free one for `cmd`

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def built_in(self) -> bool:
        """Driven by llmux itself (an engine's API, a server process) rather than by hooks."""
        return self.kind is not None or self.cmd is not None

    @property
    def has_alive(self) -> bool:
        """Whether llmux can ask if the model serves now (an alive hook, or a built-in driver)."""
        return self.alive is not None or self.built_in

    def timeout_of(self, hook: HookName) -> float:
        """How long the model's `hook` (or the built-in step in its place) may take."""
        return {
            HookName.WAKE: self.wake_timeout_secs,
            HookName.SLEEP: self.sleep_timeout_secs,
            HookName.ALIVE: self.alive_timeout_secs,
        }[hook]

    @property
    def ready_path(self) -> str:
        """The path that answers 200 once the server is up (awake or not)."""
        return self.health_path or READY_PATHS.get(self.kind or "", "/health")


@dataclass(frozen=True)
class GroupConfig:
    """Models that share one GPU (or one set of GPUs): they switch among themselves, beside and
    independently of other groups. Without a capacity, one model of the group is awake at once;
    with one, several are while their sizes fit. `gpus` names its devices (NVML indices, as
    nvidia-smi shows them), so that llmux can read how much memory they really have free."""

    name: str
    models: tuple[str, ...]
    capacity: float | None = None
    gpus: tuple[int, ...] = ()

    def size_of(self, model: ModelConfig) -> float:
        """What a model takes of the capacity; one whole slot when the group has none."""
        if self.capacity is None or model.size is None:
            return 1.0
        return model.size

    @property
    def room(self) -> float:
        return 1.0 if self.capacity is None else self.capacity


@dataclass(frozen=True)
class Config:
    path: Path
    host: str
    port: int
    server: ServerConfig
    policy: PolicyConfig
    models: dict[str, ModelConfig]
    auth: AuthConfig = AuthConfig()
    groups: dict[str, GroupConfig] = field(default_factory=dict)  # filled in by __post_init__
    machine: MachineConfig = MachineConfig()
    preload: tuple[str, ...] = ()
    created: dict[str, int] = field(default_factory=dict, compare=False)  # see http/app.py dated

    def __post_init__(self) -> None:
        if not self.groups:  # built in code or tests: every model in the default group
            default = GroupConfig(DEFAULT_GROUP, tuple(self.models))
            object.__setattr__(self, "groups", {DEFAULT_GROUP: default})

    @property
    def gpus(self) -> tuple[int, ...]:
        """Every GPU a group names, in index order."""
        return tuple(sorted(gpu for group in self.groups.values() for gpu in group.gpus))

    @property
    def hook_dir(self) -> Path:
        """Hooks run here, so relative script paths in the file work wherever llmux starts."""
        return self.path.parent

    def resolve(self, name: str) -> str | None:
        """The model a client's name means: the model itself or one of its aliases."""
        if name in self.models:
            return name
        for model in self.models.values():
            if name in model.aliases:
                return model.name
        return None

    def group_config(self, group: str) -> Config:
        """The same config narrowed to one group's models: what that group's switcher sees."""
        members = self.groups[group].models
        return replace(
            self,
            models={name: self.models[name] for name in members},
            groups={group: self.groups[group]},
            preload=tuple(name for name in self.preload if name in members),
        )

    def keeping_chosen_ports(self, old: Config) -> Config:
        """After a reload: a `cmd` server whose port llmux chose keeps it while its command is
        unchanged (a new port would mean restarting the server)."""
        models = dict(self.models)
        for name, model in models.items():
            before = old.models.get(name, model)
            if model.port_chosen and before.port_chosen and before.cmd == model.cmd:
                models[name] = replace(model, port=before.port)
        return replace(self, models=models)

    def with_listen(self, host: str | None, port: int | None) -> Config:
        """Apply `--host`/`--port` from the command line over the file's values."""
        return replace(
            self,
            host=host if host is not None else self.host,
            port=port if port is not None else self.port,
        )


# Allowed keys per table, with the types a value may have. bool is checked before int because
# TOML booleans are Python ints.
_TOP_KEYS = {
    "host": str,
    "port": int,
    "server": dict,
    "policy": dict,
    "defaults": dict,
    "models": dict,
    "auth": dict,
    "groups": dict,
    "preload": list,
    "machine": dict,
}
_MACHINE_KEYS = {"ram_gb": _NUMBER}
_SERVER_KEYS = {
    "max_body_bytes": int,
    "shutdown_timeout_secs": _NUMBER,
    "expose_hook_errors": bool,
    "access_log": bool,
    "max_queue_per_model": int,
    "max_in_flight_per_model": int,
    "request_head_timeout_secs": _NUMBER,
    "request_body_timeout_secs": _NUMBER,
    "max_header_bytes": int,
    "state_dir": str,
    "list_aliases": bool,
    "client_send_timeout_secs": _NUMBER,
    "max_connections": int,
    "listen_backlog": int,
    "workers": int,
    "gpu_margin_gb": _NUMBER,
}
_AUTH_KEYS = {
    "api_keys": list,
    "api_keys_file": str,
    "public_metrics": bool,
    "public_status": bool,
    "admin_token": str,
}
_POLICY_KEYS = {
    "name": str,
    "request_timeout_secs": _NUMBER,
    "drain_before_switch": bool,
    "min_active_secs": _NUMBER,
    "options": dict,
}
_MODEL_FIELDS = [f for f in fields(ModelConfig) if "toml" in f.metadata]
GIB = 1024**3  # the unit of every *_gb key (memory_gb, weights_gb, ram_gb, ...)
SIZE_KEYS = ("memory_gb", "size")  # two spellings of the `size` field
_MODEL_KEYS = {
    **{f.name: f.metadata["toml"] for f in _MODEL_FIELDS if f.name != "size"},
    **dict.fromkeys(SIZE_KEYS, _NUMBER),
}
_INHERITED = {f.name: f for f in _MODEL_FIELDS if f.metadata["inherited"]}
_DEFAULTS_KEYS = {name: f.metadata["toml"] for name, f in _INHERITED.items()}
_GROUP_KEYS = {"capacity": _NUMBER, "models": list, "gpus": list}


def load_config(path: str | Path) -> Config:
    """Parse and validate a config file; raise ConfigError naming the key on any problem."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document (separate from I/O so tests can feed dicts)."""
    checker = _Checker(path)
    checker.table(raw, "", _TOP_KEYS)

    host = raw.get("host", DEFAULT_HOST)
    port = checker.port(raw.get("port", DEFAULT_PORT), "port")

    auth = _parse_auth(checker, raw.get("auth", {}))
    server = _parse_server(checker, raw.get("server", {}), auth)

    policy_raw = raw.get("policy", {})
    checker.table(policy_raw, "policy", _POLICY_KEYS)
    timeout = policy_raw.get("request_timeout_secs")
    policy = PolicyConfig(
        name=policy_raw.get("name", DEFAULT_POLICY),
        request_timeout_secs=None
        if timeout is None
        else checker.positive(timeout, "policy.request_timeout_secs"),
        drain_before_switch=policy_raw.get("drain_before_switch", True),
        min_active_secs=checker.non_negative(
            policy_raw.get("min_active_secs", 0.0), "policy.min_active_secs"
        ),
        options=dict(policy_raw.get("options", {})),
    )

    defaults_raw = raw.get("defaults", {})
    checker.table(defaults_raw, "defaults", _DEFAULTS_KEYS)
    defaults = {name: f.default for name, f in _INHERITED.items()} | defaults_raw
    for name, f in _INHERITED.items():
        checker.check(f.metadata["inherited"], defaults[name], f"defaults.{name}")

    models_raw = raw.get("models", {})
    if not models_raw:
        raise ConfigError(
            path, "models", "no models configured: add at least one [models.NAME] table"
        )
    models: dict[str, ModelConfig] = {}
    for name, model_raw in models_raw.items():
        models[name] = _parse_model(checker, name, model_raw, defaults, own_port=port)
    _check_aliases(checker, models)
    choose_ports(models, {port} | {m.port for m in models.values()})
    groups = _parse_groups(checker, raw.get("groups", {}), models)
    for group in groups.values():
        for name in group.models:
            models[name] = replace(models[name], group=group.name)
    preload = _parse_preload(checker, raw.get("preload", []), models)
    machine_raw = raw.get("machine", {})
    checker.table(machine_raw, "machine", _MACHINE_KEYS)
    ram = machine_raw.get("ram_gb")
    machine = MachineConfig(None if ram is None else checker.positive(ram, "machine.ram_gb"))
    return Config(
        path=path, host=host, port=port, server=server, policy=policy, models=models,
        auth=auth, groups=groups, preload=preload, machine=machine,
    )  # fmt: skip


def _check_aliases(checker: _Checker, models: dict[str, ModelConfig]) -> None:
    """An alias names exactly one model and is not itself a model's name."""
    owner: dict[str, str] = {}
    for model in models.values():
        for alias in model.aliases:
            key = f"models.{_quote(model.name)}.aliases"
            if alias in models:
                raise ConfigError(checker.path, key, f"{alias!r} is already a model's name")
            if alias in owner:
                other = owner[alias]
                raise ConfigError(checker.path, key, f"{alias!r} is also an alias of {other!r}")
            owner[alias] = model.name


def _parse_groups(
    checker: _Checker, raw: Any, models: dict[str, ModelConfig]
) -> dict[str, GroupConfig]:
    """[groups.NAME] tables; every model no group lists joins the group named "default"."""
    if not isinstance(raw, dict):
        raise ConfigError(checker.path, "groups", "must be a table of [groups.NAME] tables")
    groups: dict[str, GroupConfig] = {}
    member_of: dict[str, str] = {}
    gpu_of: dict[int, str] = {}
    for name, table in raw.items():
        key = f"groups.{_quote(name)}"
        if not isinstance(table, dict):
            raise ConfigError(checker.path, key, "must be a table ([groups.NAME])")
        checker.table(table, key, _GROUP_KEYS)
        listed = table.get("models", [])
        if name != DEFAULT_GROUP and not listed:
            raise ConfigError(checker.path, f"{key}.models", "missing: list the group's models")
        for index, model in enumerate(listed):
            if not isinstance(model, str):
                problem = f"must be model names (strings), got {_type_name(type(model))}"
                raise ConfigError(checker.path, f"{key}.models[{index}]", problem)
            if model not in models:
                known = ", ".join(models)
                problem = f"{model!r} is not a configured model (known: {known})"
                raise ConfigError(checker.path, f"{key}.models", problem)
            if model in member_of:
                problem = f"{model!r} is already in group {member_of[model]!r}"
                raise ConfigError(checker.path, f"{key}.models", problem)
            member_of[model] = name
        capacity = table.get("capacity")
        if capacity is not None:
            checker.positive(capacity, f"{key}.capacity")
        gpus = _parse_gpus(checker, table.get("gpus", []), f"{key}.gpus", name, gpu_of)
        groups[name] = GroupConfig(name, tuple(listed), capacity, gpus)
    unlisted = tuple(m for m in models if m not in member_of)
    if unlisted:
        default = groups.get(DEFAULT_GROUP, GroupConfig(DEFAULT_GROUP, ()))
        groups[DEFAULT_GROUP] = replace(default, models=default.models + unlisted)
    groups = {name: group for name, group in groups.items() if group.models}
    for group in groups.values():
        if group.capacity is None:
            continue
        for name in group.models:
            size = models[name].size
            key = f"models.{_quote(name)}"
            if size is None:
                problem = f"group {group.name!r} has a capacity: give the model memory_gb or size"
                raise ConfigError(checker.path, key, problem)
            if size > group.capacity:
                problem = (
                    f"size {size:g} exceeds the capacity {group.capacity:g} of group {group.name!r}"
                )
                raise ConfigError(checker.path, key, problem)
    return groups


def _parse_gpus(
    checker: _Checker, raw: list[Any], key: str, group: str, gpu_of: dict[int, str]
) -> tuple[int, ...]:
    """A group's GPUs: NVML indices, each in one group only (`gpu_of` records the owners)."""
    for index, gpu in enumerate(raw):
        if not _is_type(gpu, int) or gpu < 0:
            problem = f"must be GPU indices (integers from 0, as nvidia-smi shows), got {gpu!r}"
            raise ConfigError(checker.path, f"{key}[{index}]", problem)
        if gpu_of.get(gpu) == group:
            raise ConfigError(checker.path, f"{key}[{index}]", f"GPU {gpu} is listed twice")
        if gpu in gpu_of:
            problem = (
                f"GPU {gpu} is already in group {gpu_of[gpu]!r}: groups switch independently, "
                "so two groups on one GPU could both wake into the same free memory"
            )
            raise ConfigError(checker.path, f"{key}[{index}]", problem)
        gpu_of[gpu] = group
    return tuple(raw)


def _parse_preload(checker: _Checker, raw: list[Any], models: dict[str, ModelConfig]) -> tuple:
    for index, name in enumerate(raw):
        if not isinstance(name, str) or name not in models:
            known = ", ".join(models)
            problem = f"{name!r} is not a configured model (known: {known})"
            raise ConfigError(checker.path, f"preload[{index}]", problem)
        if raw.index(name) != index:
            raise ConfigError(checker.path, f"preload[{index}]", f"{name!r} is listed twice")
    return tuple(raw)


def _parse_server(checker: _Checker, raw: Any, auth: AuthConfig) -> ServerConfig:
    checker.table(raw, "server", _SERVER_KEYS)
    values: dict[str, Any] = {}
    for key, kind in _SERVER_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        if key in ("shutdown_timeout_secs", "gpu_margin_gb"):
            value = checker.non_negative(value, f"server.{key}")
        elif kind in (int, _NUMBER):
            value = checker.positive(value, f"server.{key}")
        values[key] = value
    # A hook's stderr can carry secrets: keep it out of answers when clients are strangers.
    values.setdefault("expose_hook_errors", not auth.required)
    return ServerConfig(**values)


def _parse_auth(checker: _Checker, raw: Any) -> AuthConfig:
    checker.table(raw, "auth", _AUTH_KEYS)
    keys = list(raw.get("api_keys", []))
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(checker.path, f"auth.api_keys[{index}]", "must be a non-empty string")
    if "api_keys_file" in raw:
        keys_path = checker.path.parent / raw["api_keys_file"]
        try:
            lines = keys_path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            problem = f"cannot read {keys_path}: {exc.strerror}"
            raise ConfigError(checker.path, "auth.api_keys_file", problem) from None
        except UnicodeDecodeError as exc:
            problem = f"{keys_path} is not UTF-8 text (byte {exc.start})"
            raise ConfigError(checker.path, "auth.api_keys_file", problem) from None
        except ValueError:  # a NUL in the name
            problem = f"{raw['api_keys_file']!r} is not a file name"
            raise ConfigError(checker.path, "auth.api_keys_file", problem) from None
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    token = raw.get("admin_token")
    if token is not None and len(token) < 16:
        raise ConfigError(checker.path, "auth.admin_token", "must be at least 16 characters")
    return AuthConfig(
        api_keys=tuple(keys),
        public_metrics=raw.get("public_metrics", False),
        public_status=raw.get("public_status", False),
        admin_token=token,
    )


def _parse_model(
    checker: _Checker, name: str, raw: Any, defaults: dict[str, Any], own_port: int
) -> ModelConfig:
    key = f"models.{_quote(name)}"
    if not isinstance(raw, dict):
        raise ConfigError(checker.path, key, "must be a table ([models.NAME])")
    checker.table(raw, key, _MODEL_KEYS)
    driver = _parse_driver(checker, raw, key)
    if "port" in raw:
        port = checker.port(raw["port"], f"{key}.port")
        if port == own_port:
            raise ConfigError(checker.path, f"{key}.port", f"{port} is llmux's own port")
    elif driver["cmd"] is not None:
        port = 0  # chosen by parse_config, once every model's port is known
    else:
        raise ConfigError(checker.path, f"{key}.port", "missing (required unless cmd is set)")
    inherited = {
        name: checker.check(f.metadata["inherited"], raw.get(name, defaults[name]), f"{key}.{name}")
        for name, f in _INHERITED.items()
    }
    given = [k for k in SIZE_KEYS if k in raw]
    if len(given) > 1:
        raise ConfigError(checker.path, key, "give memory_gb or size, not both")
    size = raw[given[0]] if given else None
    if size is not None:
        checker.positive(size, f"{key}.{given[0]}")
    aliases = raw.get("aliases", [])
    for index, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            raise ConfigError(checker.path, f"{key}.aliases[{index}]", "must be a non-empty string")
    upstream = raw.get("upstream_model")
    if upstream is not None and not upstream.strip():
        raise ConfigError(checker.path, f"{key}.upstream_model", "must not be empty")
    backend_key = raw.get("backend_api_key")
    if backend_key is not None and (not backend_key.strip() or not backend_key.isprintable()):
        raise ConfigError(checker.path, f"{key}.backend_api_key", "must be a printable key")
    return ModelConfig(
        name=name,
        port=port,
        port_chosen=port == 0,
        **driver,
        size=size,
        size_in_gib=given == ["memory_gb"],
        aliases=tuple(dict.fromkeys(aliases)),
        upstream_model=upstream,
        passthrough_paths=_passthrough_paths(checker, raw.get("passthrough_paths", []), key),
        backend_api_key=backend_key,
        **inherited,
    )


def _parse_driver(checker: _Checker, raw: dict[str, Any], key: str) -> dict[str, Any]:
    """How the model is woken and put to sleep: its shell hooks, or `kind` and/or `cmd`."""
    hooks = {hook.value: raw.get(hook.value) for hook in HookName}
    kind, cmd = raw.get("kind"), raw.get("cmd")
    given = [hook for hook, command in hooks.items() if command is not None]
    if (kind is not None or cmd is not None) and given:
        problem = f"{', '.join(given)} given with kind or cmd: give hooks or kind/cmd, not both"
        raise ConfigError(checker.path, f"{key}.{given[0]}", problem)
    for hook in given:
        checker.hook(hooks[hook], f"{key}.{hook}")
    if kind is not None and kind not in KINDS:
        problem = f"unknown kind {kind!r} (known: {', '.join(KINDS)}; or give hooks)"
        raise ConfigError(checker.path, f"{key}.kind", problem)
    if cmd is not None:
        checker.hook(cmd, f"{key}.cmd")
        if kind == "ollama":
            problem = "an Ollama server holds several models: run `ollama serve` as its own service"
            raise ConfigError(checker.path, f"{key}.cmd", problem)
    if kind is None and cmd is None:
        for required in (HookName.WAKE.value, HookName.SLEEP.value):
            if hooks[required] is None:
                problem = "missing (required unless kind or cmd is set)"
                raise ConfigError(checker.path, f"{key}.{required}", problem)
    level = raw.get("sleep_level", 1)
    if "sleep_level" in raw and kind != "vllm":
        raise ConfigError(checker.path, f"{key}.sleep_level", 'only for kind = "vllm"')
    auto = level == "auto"
    if auto:
        level = 1
    elif isinstance(level, bool) or level not in SLEEP_LEVELS:
        problem = f'must be 1, 2 or "auto", got {level!r}'
        raise ConfigError(checker.path, f"{key}.sleep_level", problem)
    weights = raw.get("weights_gb")
    if weights is not None:
        if kind != "vllm":
            raise ConfigError(checker.path, f"{key}.weights_gb", 'only for kind = "vllm"')
        checker.non_negative(weights, f"{key}.weights_gb")
    health = raw.get("health_path")
    if health is not None and not _is_plain_path(health):
        problem = f"{health!r} must be a plain path such as /health"
        raise ConfigError(checker.path, f"{key}.health_path", problem)
    return {
        **hooks,
        "kind": kind,
        "cmd": cmd,
        "sleep_level": level,
        "auto_sleep_level": auto,
        "weights_gb": weights,
        "health_path": health,
    }


def choose_ports(models: dict[str, ModelConfig], taken: set[int]) -> None:
    """Give each `cmd` model that names no port a free loopback one, in place (each is held
    open until all are chosen, so that no two get the same one)."""
    held = []
    try:
        for name, model in models.items():
            if not model.port_chosen:
                continue
            while True:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                held.append(sock)
                port = sock.getsockname()[1]
                if port not in taken:
                    break
            taken.add(port)
            models[name] = replace(model, port=port)
    finally:
        for sock in held:
            sock.close()


def _passthrough_paths(checker: _Checker, raw: list[Any], key: str) -> tuple[str, ...]:
    """Path prefixes of a backend that /upstream/NAME/... may reach: plain paths only."""
    for index, prefix in enumerate(raw):
        where = f"{key}.passthrough_paths[{index}]"
        if not isinstance(prefix, str):
            raise ConfigError(checker.path, where, "must be a string")
        if not _is_plain_path(prefix):
            problem = f"{prefix!r} must be a plain path such as /tokenize (no .., no %, no ?)"
            raise ConfigError(checker.path, where, problem)
    return tuple(raw)


def _is_plain_path(path: str) -> bool:
    """A path that passes the route table's rules and holds no encoding or query."""
    if any(c in path for c in "%?"):
        return False
    try:
        check_path(path.encode("ascii"))
    except (InvalidPath, UnicodeEncodeError):
        return False
    return True


def _quote(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else f'"{name}"'


class _Checker:
    """Small validators that raise ConfigError with the file and key filled in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def table(self, value: Any, key: str, allowed: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(self.path, key, "must be a table")
        for name, item in value.items():
            full = f"{key}.{name}" if key else name
            if name not in allowed:
                if isinstance(item, dict) and key.startswith("models."):
                    raise ConfigError(
                        self.path, full, "a model name with dots must be quoted: "
                        f'[models."{key.removeprefix("models.")}.{name}"]',
                    )  # fmt: skip
                hint = ", ".join(sorted(allowed))
                raise ConfigError(self.path, full, f"unknown key (known here: {hint})")
            expected = allowed[name]
            if not _is_type(item, expected):
                raise ConfigError(
                    self.path, full, f"must be {_type_name(expected)}, got {_type_name(type(item))}"
                )

    def port(self, value: Any, key: str) -> int:
        if not _is_type(value, int) or not 0 < value < 65536:
            raise ConfigError(self.path, key, f"must be a port number 1-65535, got {value!r}")
        return value

    def positive(self, value: Any, key: str) -> Any:
        if not _is_type(value, _NUMBER) or not math.isfinite(value) or value <= 0:
            raise ConfigError(self.path, key, f"must be a positive number, got {value!r}")
        return value

    def non_negative(self, value: Any, key: str) -> Any:
        if not _is_type(value, _NUMBER) or not math.isfinite(value) or value < 0:
            raise ConfigError(self.path, key, f"must be zero or a positive number, got {value!r}")
        return value

    def check(self, rule: str, value: Any, key: str) -> Any:
        """Check `value` by a rule named in a key's declaration ("positive", "non_negative")."""
        return self.positive(value, key) if rule == "positive" else self.non_negative(value, key)

    def hook(self, command: str, key: str) -> None:
        """Reject empty hooks and scripts named by path that do not exist next to the config."""
        if not command.strip():
            raise ConfigError(self.path, key, "empty hook command")
        try:
            words = hook_words(command)
        except ValueError as exc:
            raise ConfigError(self.path, key, f"cannot parse shell command: {exc}") from None
        program = words[0] if words else ""
        if "\0" in command:
            raise ConfigError(self.path, key, "a hook command cannot hold a NUL character")
        if "/" in program:
            try:
                script = (self.path.parent / program).resolve()
                found = script.exists()
            except OSError as exc:
                raise ConfigError(self.path, key, f"cannot look at {program}: {exc}") from None
            if not found:
                raise ConfigError(
                    self.path, key, f"hook script {program} not found (looked at {script})"
                )


def hook_words(command: str) -> list[str]:
    """A hook's words from its program on: leading `NAME=value` assignments are skipped
    (`MODEL=/m.gguf ./start.sh` runs ./start.sh). ValueError if the shell could not parse it."""
    words = shlex.split(command, comments=True)
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def _is_type(value: Any, expected: Any) -> bool:
    if isinstance(value, bool):
        return expected is bool or (isinstance(expected, tuple) and bool in expected)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
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
