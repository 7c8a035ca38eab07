"""Read and validate the TOML config once, into frozen dataclasses: nothing else sees raw dicts.

Every error names the file, the dotted key and what is wrong, so `llmux check` and `llmux serve`
can refuse a bad file before anything binds a port.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmux.config_checker import Checker, ConfigError, is_type, type_name
from llmux.config_keys import (
    NON_NEGATIVE,
    NUMBER,
    PORT,
    POSITIVE,
    UNSET,
    KeySpec,
    Table,
    config_key,
)
from llmux.core.states import HookName
from llmux.errors import InvalidPath
from llmux.model_names import model_name_problem
from llmux.request_target import check_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
DEFAULT_GROUP = "default"  # the group of every model no [groups.NAME] table lists


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One data-plane process per core, up to 8 (the controller is one more, mostly idle)."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class ServerConfig:
    """[server]: how llmux serves clients."""

    max_body_bytes: int = config_key(
        int,
        32 * 1024 * 1024,
        "Larger request bodies get 413 before reaching a model.",
        rule=POSITIVE,
    )
    shutdown_timeout_secs: float = config_key(
        NUMBER, 30.0, "On SIGTERM or SIGINT, how long in-flight requests get to finish.",
        rule=NON_NEGATIVE,
    )  # fmt: skip
    expose_hook_errors: bool = config_key(
        bool, True, "Show a failed hook's last stderr lines in the 503 it causes.",
        note="true, unless [auth] api_keys are set (a hook's stderr can carry secrets)",
        example=True,
    )  # fmt: skip
    access_log: bool = config_key(
        bool, True, "One log line per request: method, path, model, status, queue wait, duration."
    )
    max_queue_per_model: int = config_key(
        int, 256, "Requests that may wait for one model; beyond it 503 with Retry-After.",
        rule=POSITIVE,
    )  # fmt: skip
    max_in_flight_per_model: int | None = config_key(
        int, None, "Requests one model serves at once; beyond it they queue for a free slot.",
        rule=POSITIVE, example=64, note="no limit",
    )  # fmt: skip
    request_head_timeout_secs: float = config_key(
        NUMBER, 75.0, "A request head, and an idle keep-alive connection, must arrive within this.",
        rule=POSITIVE,
    )  # fmt: skip
    request_body_timeout_secs: float = config_key(
        NUMBER, 60.0, "A request body must arrive within this, or 408 (no slow-loris).",
        rule=POSITIVE,
    )  # fmt: skip
    max_header_bytes: int = config_key(
        int, 16 * 1024, "A larger request head is refused.", rule=POSITIVE
    )
    state_dir: str | None = config_key(
        str, None, "Instance locks, running hooks, server and hook logs; must be llmux's own. "
        "A relative path is from the config file's folder.",
        example="/run/llmux",
        note="$RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/llmux, else <tmp>/llmux-<uid> (0700)",
    )  # fmt: skip
    list_aliases: bool = config_key(bool, False, "/v1/models also lists each model's aliases.")
    client_send_timeout_secs: float = config_key(
        NUMBER, 60.0, "A client that takes no bytes this long is cut, its model slot freed.",
        rule=POSITIVE,
    )  # fmt: skip
    max_connections: int = config_key(
        int, 4096, "Open client connections; beyond it 503 with Retry-After, then close.",
        rule=POSITIVE,
    )  # fmt: skip
    listen_backlog: int = config_key(
        int, 2048, "Connections the kernel queues until llmux accepts them (capped by "
        "net.core.somaxconn, which llmux raises when it may).", rule=POSITIVE,
    )  # fmt: skip
    workers: int = config_key(
        int, doc="Data-plane processes beside the controller (`llmux serve`; 1: one process). "
        "Read at start, not on reload.", rule=POSITIVE, factory=lambda: default_workers(),
        note="the cores, up to 8", example=2,
    )  # fmt: skip
    gpu_margin_gb: float = config_key(
        NUMBER, 1.0, "GiB left free on each GPU a group names beyond a model's memory_gb "
        "(CUDA context, buffers), checked before a switch wakes it.", rule=NON_NEGATIVE,
    )  # fmt: skip
    stream_wait_notice: bool = config_key(
        bool, False, "A streaming request that waits over a second for its model gets its "
        "head and an SSE comment every 3 s saying why (`: waiting for qwen to wake, 2nd in "
        "line, about 7 s`), so idle timeouts keep the connection.",
    )  # fmt: skip


@dataclass(frozen=True)
class AuthConfig:
    """[auth]: who may use llmux. Without api_keys, anyone who reaches the port may."""

    api_keys: tuple[str, ...] = config_key(
        list, (), "Clients send `Authorization: Bearer <key>` or `x-api-key: <key>`.",
        items=str, example=["sk-local-1"],
    )  # fmt: skip
    api_keys_file: str | None = config_key(
        str, None, "One key per line (# comments), relative to this file, re-read on reload.",
        example="keys.txt",
    )  # fmt: skip
    public_metrics: bool = config_key(bool, False, "With api_keys: serve /metrics without a key.")
    public_status: bool = config_key(
        bool, False, "With api_keys: serve /llmux/status without a key."
    )
    admin_token: str | None = config_key(
        str, None, "Enables the admin API (wake, sleep) for whoever sends it.",
        min_length=16, example="at least 16 characters",
    )  # fmt: skip

    @property
    def required(self) -> bool:
        return bool(self.api_keys)


# The built-in policy that won the trace replays (docs/policies.md).
DEFAULT_POLICY = "adaptive"


@dataclass(frozen=True)
class MachineConfig:
    """The box itself, beside its GPUs: the host RAM llmux may fill with the weights of models
    asleep at level 1 (vLLM keeps them in host RAM to wake fast); None: the machine's RAM less
    a reserve for the system (runtime/machine.py)."""

    ram_gb: float | None = config_key(
        NUMBER, None, "Host RAM (GiB) the weights of models asleep at level 1 may fill, shared "
        "by every group; a level-1 sleep that would not fit sleeps at level 2.", rule=POSITIVE,
        example=200, note="the machine's RAM less max(4 GiB, 20%)",
    )  # fmt: skip


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: when to switch."""

    name: str = config_key(
        str, DEFAULT_POLICY, 'The switch policy: "adaptive", "fifo", "exhaustive", "cost_aware", '
        '"package.module:Class" or "/path/to/file.py:Class".',
    )  # fmt: skip
    request_timeout_secs: float | None = config_key(
        NUMBER, None, "A queued request waits at most this long, then gets 504.", rule=POSITIVE,
        example=300, note="waits as long as it takes",
    )  # fmt: skip
    drain_before_switch: bool = config_key(
        bool, True, "Let in-flight requests (streams included) finish before the sleep."
    )
    min_active_secs: float = config_key(
        NUMBER, 0.0, "Keep a freshly woken model serving at least this long (stops thrashing).",
        rule=NON_NEGATIVE,
    )  # fmt: skip
    options: dict[str, Any] = config_key(
        dict, doc="Keyword arguments for the policy class ([policy.options]; fifo takes none).",
        factory=dict,
    )  # fmt: skip


KINDS = ("vllm", "sglang", "ollama")  # engines whose sleep/wake API llmux drives itself
READY_PATHS = {"ollama": "/api/version"}  # where a server's readiness is asked, if not /health
SLEEP_LEVELS = (1, 2)
_INHERIT = {"inherited": True}


@dataclass(frozen=True)
class ModelConfig:
    """One [models.NAME] table. Each field declared with `key` is a key of that table; the
    parser, its known-keys check and [defaults] are derived from these declarations."""

    name: str
    port: int = config_key(
        int, 0, "The backend listens on http://127.0.0.1:PORT (models may share a port).",
        rule=PORT, example=8001, required="unless cmd is set (then a free port is chosen)",
    )  # fmt: skip
    # Shell hooks, or a built-in driver (`kind`, `cmd`): a model uses one or the other.
    wake: str | None = config_key(
        str, None, "Hook: make the model serve; exit only once it does.",
        example="./scripts/wake-llama.sh", required="unless kind or cmd is set",
    )  # fmt: skip
    sleep: str | None = config_key(
        str, None, "Hook: release the GPU (llmux has drained the model first).",
        example="./scripts/sleep-llama.sh", required="unless kind or cmd is set",
    )  # fmt: skip
    alive: str | None = config_key(
        str, None, "Hook: exit 0 only if the model serves now (vLLM: /is_sleeping, not /health).",
        example="./scripts/serving-llama.sh",
    )  # fmt: skip
    kind: str | None = config_key(
        str, None, "A built-in driver: llmux calls the engine's own sleep and wake API.",
        choices=KINDS, example="vllm",
    )  # fmt: skip
    cmd: str | None = config_key(
        str, None, "A server llmux starts itself, under sh -c in the config's folder; ${PORT} "
        "and ${MODEL} are filled in. Without kind it is stopped to sleep and started to wake.",
        example="vllm serve Qwen/Qwen2.5-7B-Instruct --port ${PORT} --enable-sleep-mode",
    )  # fmt: skip
    # vLLM: 1 offloads weights to CPU RAM, 2 discards them; "auto" (auto_sleep_level): chosen
    # at each sleep, `sleep_level` then being the level assumed before the first choice.
    sleep_level: int = config_key(
        (int, str), 1, 'kind = "vllm": 1 offloads the weights to host RAM (fast wake), 2 '
        'discards them (reloaded on wake), "auto" chooses at each sleep.', choices=(1, 2, "auto"),
    )  # fmt: skip
    auto_sleep_level: bool = False
    weights_gb: float | None = config_key(
        NUMBER, None, 'kind = "vllm": host RAM (GiB) its level-1 sleep fills, until llmux has '
        "measured it.", rule=NON_NEGATIVE, example=16,
    )  # fmt: skip
    health_path: str | None = config_key(
        str, None, "The model's server is ready once this path answers 200.", example="/health",
        note="/health (ollama: /api/version)",
    )  # fmt: skip
    wake_timeout_secs: float = config_key(
        NUMBER, 600.0, "How long a wake may take (a cold start of a large model takes minutes).",
        rule=POSITIVE, **_INHERIT,
    )  # fmt: skip
    sleep_timeout_secs: float = config_key(
        NUMBER, 120.0, "How long a sleep may take.", rule=POSITIVE, **_INHERIT
    )
    alive_timeout_secs: float = config_key(
        NUMBER, 10.0, "How long an alive check may take.", rule=POSITIVE, **_INHERIT
    )
    alive_interval_secs: float = config_key(
        NUMBER, 10.0, "How often an idle active model is checked to still serve.", rule=POSITIVE,
        **_INHERIT,
    )  # fmt: skip
    # The backend's answer: its first byte within this (vLLM sends a non-streamed answer's
    # first byte only when generation ends), then no gap longer than idle_timeout_secs.
    first_byte_timeout_secs: float = config_key(
        NUMBER, 600.0, "The backend's first byte must come within this, else 504 (vLLM sends "
        "a non-streamed answer's only when it is done).", rule=POSITIVE, **_INHERIT,
    )  # fmt: skip
    idle_timeout_secs: float = config_key(
        NUMBER, 300.0, "Then no gap between bytes longer than this, or the answer is cut.",
        rule=POSITIVE, **_INHERIT,
    )  # fmt: skip
    ttl_secs: float = config_key(
        NUMBER, 0.0, "An awake model idle this long is put to sleep (0: never).",
        rule=NON_NEGATIVE, **_INHERIT,
    )  # fmt: skip
    # What it takes of its group's capacity, given as memory_gb or size (see SIZE_KEYS).
    size: float | None = config_key(
        NUMBER, None, "What it takes of its group's capacity, unitless (or give memory_gb).",
        rule=POSITIVE, example=1,
        also=(
            KeySpec(
                "memory_gb", NUMBER, UNSET, "What it takes of its group's capacity, in GiB "
                "(the GPU check compares it with free memory); or give size.", rule=POSITIVE,
                example=20,
            ),
        ),
    )  # fmt: skip
    size_in_gib: bool = False  # given as memory_gb: GiB, which the GPU check compares with
    aliases: tuple[str, ...] = config_key(
        list, (), "Other names clients may use for this model.", items=str,
        example=["gpt-4o-mini"],
    )  # fmt: skip
    upstream_model: str | None = config_key(
        str, None, "The `model` the backend is sent.", example="meta-llama/Llama-3.1-8B-Instruct",
        note="the model's name",
    )  # fmt: skip
    passthrough_paths: tuple[str, ...] = config_key(
        list, (), "Backend paths outside llmux's route table that clients may reach as "
        "/upstream/NAME/PATH (never list /sleep or /wake_up).", items=str,
        example=["/tokenize"],
    )  # fmt: skip
    backend_api_key: str | None = config_key(
        str, None, "Sent to the backend as `Authorization: Bearer ...` (the client's key never "
        "is).", example="...",
    )  # fmt: skip
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
    models: tuple[str, ...] = config_key(
        list, (), "The group's models; a model is in one group at most.", items=str,
        example=["llama"], required="except in [groups.default]",
    )  # fmt: skip
    capacity: float | None = config_key(
        NUMBER, None, "Room for models awake at once, in the unit of their memory_gb (or size).",
        rule=POSITIVE, example=80, note="one model awake at a time",
    )  # fmt: skip
    gpus: tuple[int, ...] = config_key(
        list, (), "Its GPUs, as nvidia-smi numbers them: llmux reads their free memory before "
        "a wake. A GPU is in one group at most.", items=int, example=[0],
    )  # fmt: skip

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
    """The whole file. Its top-level keys are declared here; its tables in TABLES."""

    path: Path
    host: str = config_key(
        str, DEFAULT_HOST, "Listen address: keep loopback unless a proxy or firewall guards it."
    )
    port: int = config_key(int, DEFAULT_PORT, "Listen port (--port overrides).", rule=PORT)
    server: ServerConfig = ServerConfig()
    policy: PolicyConfig = PolicyConfig()
    models: dict[str, ModelConfig] = field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    groups: dict[str, GroupConfig] = field(default_factory=dict)  # filled in by __post_init__
    machine: MachineConfig = MachineConfig()
    preload: tuple[str, ...] = config_key(
        list, (), "Wake these at start-up, in order, while their groups have room.", items=str,
        example=["llama"],
    )  # fmt: skip
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


GIB = 1024**3  # the unit of every *_gb key (memory_gb, weights_gb, ram_gb, ...)
SIZE_KEYS = ("memory_gb", "size")  # two spellings of the `size` field


def _sub_table(name: str, doc: str) -> KeySpec:
    return KeySpec(name, dict, UNSET, doc)


# The file's tables, in the order the reference and the example show them.
TABLES = (
    Table(
        "", Config, "The top level: where llmux listens and what it wakes at start-up.",
        extra=(
            _sub_table("server", "[server]: how llmux serves clients."),
            _sub_table("auth", "[auth]: who may use llmux."),
            _sub_table("policy", "[policy]: when to switch."),
            _sub_table("defaults", "[defaults]: what every model inherits."),
            _sub_table("models", "[models.NAME]: one table per model."),
            _sub_table("groups", "[groups.NAME]: models that share a GPU."),
            _sub_table("machine", "[machine]: the box itself."),
        ),
    ),
    Table("server", ServerConfig, "How llmux serves clients."),
    Table("auth", AuthConfig, "Who may use llmux: without api_keys, anyone who reaches the port."),
    Table("policy", PolicyConfig, "When to switch (see Switch policies)."),
    Table(
        "defaults", ModelConfig, "What every model inherits, each model may override.",
        inherited_only=True,
    ),
    Table(
        "models.NAME", ModelConfig, "One table per model; NAME is what clients put in `model` "
        '(quote names with / or .: [models."Qwen/Qwen2.5-7B"]). A model has hooks (wake, sleep, '
        "alive) or a built-in driver (kind and/or cmd), not both.",
    ),
    Table(
        "groups.NAME", GroupConfig, "Models that share a GPU switch among themselves; groups "
        'switch in parallel. Every model no group lists is in the group "default", where one '
        "model is awake at a time. With a capacity, several are while their sizes fit.",
    ),
    Table(
        "machine", MachineConfig, "The box itself: the host RAM of models asleep at level 1.",
    ),
)  # fmt: skip
_TABLE = {table.name: table for table in TABLES}
_INHERITED = {spec.name: spec for spec in _TABLE["defaults"].keys}


def load_config(path: str | Path) -> Config:
    """Parse and validate a config file; raise ConfigError naming the key of every problem."""
    try:
        path = Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of symlinks
        raise ConfigError(os.path.abspath(path), "", f"cannot read: {exc}") from None
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
    except RecursionError:
        raise ConfigError(path, "", "invalid TOML: nested too deep") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document (separate from I/O so tests can feed dicts).
    Each table and each model is checked even after a problem elsewhere, and every problem is
    raised at once; a part that failed is left out of later checks (no problem counted twice)."""
    top_keys = frozenset(spec.name for spec in _TABLE[""].keys if spec.toml is not dict)
    checker = Checker(path, top_keys)
    written = set(raw) if isinstance(raw, dict) else set()
    raw = checker.table(raw, "", _TABLE[""].allowed)
    # preload's items are checked by _parse_preload, which says each problem of each.
    top = _values(checker, {k: v for k, v in raw.items() if k != "preload"}, _TABLE[""])
    port = top.get("port", DEFAULT_PORT)

    auth = AuthConfig()
    with checker.section():
        auth = _parse_auth(checker, raw.get("auth", {}))
    server = ServerConfig()
    with checker.section():
        server = _parse_server(checker, raw.get("server", {}), auth)
    policy = PolicyConfig()
    with checker.section():
        policy = PolicyConfig(**_values(checker, raw.get("policy", {}), _TABLE["policy"]))
    defaults = {name: spec.default for name, spec in _INHERITED.items()}
    with checker.section():
        defaults |= _values(checker, raw.get("defaults", {}), _TABLE["defaults"])

    models_raw = raw.get("models", {})
    if not models_raw and "models" not in written:
        problem = "no models configured: add at least one [models.NAME] table"
        checker.problems.append(ConfigError(path, "models", problem))
    models: dict[str, ModelConfig] = {}
    flawed: dict[str, ModelConfig] = {}  # models with problems, as far as they parsed
    for name, model_raw in models_raw.items():
        if problem := model_name_problem(name):
            checker.problems.append(checker.error("models", problem))
        try:
            models[name] = _parse_model(checker, name, model_raw, defaults, own_port=port)
        except ConfigError as exc:
            checker.problems.extend(exc.problems)
            if exc.partial is not None:
                flawed[name] = exc.partial
    with checker.section():
        _check_aliases(checker, models)
    choose_ports(models, {port} | {m.port for m in models.values()})
    names = set(models_raw)  # a model whose table failed still exists for the checks below
    groups: dict[str, GroupConfig] = {}
    with checker.section():
        groups = _parse_groups(checker, raw.get("groups", {}), models, names)
    for group in groups.values():
        for name in group.models:
            if name in models:
                models[name] = replace(models[name], group=group.name)
    preload: tuple[str, ...] = ()
    with checker.section():
        preload = _parse_preload(checker, tuple(raw.get("preload", ())), names)
    machine = MachineConfig()
    with checker.section():
        machine = MachineConfig(**_values(checker, raw.get("machine", {}), _TABLE["machine"]))
    config = Config(
        path=path, host=top.get("host", DEFAULT_HOST), port=port, server=server, policy=policy,
        models=models, auth=auth, groups=groups, preload=preload, machine=machine,
    )  # fmt: skip
    if checker.problems:
        error = ConfigError.of(checker.problems)
        # What did parse, flawed models too: `llmux check` looks at their hooks as well.
        error.partial = replace(config, models=models | flawed)
        raise error
    return config


def _values(checker: Checker, raw: Any, table: Table) -> dict[str, Any]:
    """The keys of `table` that `raw` gives, each checked by its declaration (the sub-tables
    of the top level are left to their own parsers). Every problem is kept, none raised."""
    prefix = table.name
    raw = checker.table(raw, prefix, table.allowed)
    values = {}
    for spec in table.keys:
        if spec.name not in raw or (spec.toml is dict and table.name == ""):
            continue
        where = f"{prefix}.{spec.name}" if prefix else spec.name
        with checker.section():
            value = checker.spec(spec, raw[spec.name], where)
            values[spec.name] = tuple(value) if isinstance(value, list) else value
    return values


def _check_aliases(checker: Checker, models: dict[str, ModelConfig]) -> None:
    """An alias names exactly one model and is not itself a model's name."""
    owner: dict[str, str] = {}
    for model in models.values():
        for alias in model.aliases:
            key = f"models.{quote_name(model.name)}.aliases"
            if alias in models:
                checker.problems.append(checker.error(key, f"{alias!r} is already a model's name"))
            elif alias in owner:
                other = owner[alias]
                problem = f"{alias!r} is also an alias of {other!r}"
                checker.problems.append(checker.error(key, problem))
            owner.setdefault(alias, model.name)


def _parse_groups(
    checker: Checker, raw: Any, models: dict[str, ModelConfig], names: set[str]
) -> dict[str, GroupConfig]:
    """[groups.NAME] tables; every model no group lists joins the group named "default"."""
    if not isinstance(raw, dict):
        raise checker.error("groups", "must be a table of [groups.NAME] tables")
    groups: dict[str, GroupConfig] = {}
    member_of: dict[str, str] = {}
    gpu_of: dict[int, str] = {}
    allowed = _TABLE["groups.NAME"].allowed
    for name, table in raw.items():
        key = f"groups.{quote_name(name)}"
        if not isinstance(table, dict):
            checker.problems.append(checker.error(key, "must be a table ([groups.NAME])"))
            continue
        table = checker.table(table, key, allowed)
        with checker.section():
            groups[name] = _parse_group(checker, name, table, names, member_of, gpu_of)
    unlisted = tuple(m for m in models if m not in member_of)
    if unlisted:
        default = groups.get(DEFAULT_GROUP, GroupConfig(DEFAULT_GROUP, ()))
        groups[DEFAULT_GROUP] = replace(default, models=default.models + unlisted)
    groups = {name: group for name, group in groups.items() if group.models}
    for group in groups.values():
        if group.capacity is None:
            continue
        for name in group.models:
            if name not in models:
                continue
            size = models[name].size
            key = f"models.{quote_name(name)}"
            if size is None:
                problem = f"group {group.name!r} has a capacity: give the model memory_gb or size"
                checker.problems.append(checker.error(key, problem))
            elif size > group.capacity:
                problem = (
                    f"size {size:g} exceeds the capacity {group.capacity:g} of group {group.name!r}"
                )
                checker.problems.append(checker.error(key, problem))
    return groups


def _parse_group(
    checker: Checker,
    name: str,
    table: dict[str, Any],
    names: set[str],
    member_of: dict[str, str],
    gpu_of: dict[int, str],
) -> GroupConfig:
    key = f"groups.{quote_name(name)}"
    listed = table.get("models", [])
    if name != DEFAULT_GROUP and not listed:
        checker.problems.append(checker.error(f"{key}.models", "missing: list the group's models"))
    members = []
    for index, model in enumerate(listed):
        problem = None
        if not isinstance(model, str):
            problem = f"must be model names (strings), got {type_name(type(model))}"
            checker.problems.append(checker.error(f"{key}.models[{index}]", problem))
            continue
        if model not in names:
            known = ", ".join(sorted(names))
            problem = f"{model!r} is not a configured model (known: {known})"
        elif member_of.get(model) == name:
            problem = f"{model!r} is listed twice"
        elif model in member_of:
            problem = f"{model!r} is already in group {member_of[model]!r}"
        if problem is not None:
            checker.problems.append(checker.error(f"{key}.models", problem))
            continue
        member_of[model] = name
        members.append(model)
    capacity = table.get("capacity")
    if capacity is not None:
        with checker.section():
            checker.positive(capacity, f"{key}.capacity")
    gpus: tuple[int, ...] = ()
    with checker.section():
        gpus = _parse_gpus(checker, table.get("gpus", []), f"{key}.gpus", name, gpu_of)
    return GroupConfig(name, tuple(members), capacity, gpus)


def _parse_gpus(
    checker: Checker, raw: list[Any], key: str, group: str, gpu_of: dict[int, str]
) -> tuple[int, ...]:
    """A group's GPUs: NVML indices, each in one group only (`gpu_of` records the owners)."""
    problems = []
    for index, gpu in enumerate(raw):
        problem = None
        if not is_type(gpu, int) or gpu < 0:
            problem = f"must be GPU indices (integers from 0, as nvidia-smi shows), got {gpu!r}"
        elif gpu_of.get(gpu) == group:
            problem = f"GPU {gpu} is listed twice"
        elif gpu in gpu_of:
            problem = (
                f"GPU {gpu} is already in group {gpu_of[gpu]!r}: groups switch independently, "
                "so two groups on one GPU could both wake into the same free memory"
            )
        if problem is None:
            gpu_of[gpu] = group
        else:
            problems.append(checker.error(f"{key}[{index}]", problem))
    if problems:
        raise ConfigError.of(problems)
    return tuple(raw)


def _parse_preload(checker: Checker, raw: tuple[Any, ...], names: set[str]) -> tuple:
    for index, name in enumerate(raw):
        if not isinstance(name, str):
            problem = f"must be a model's name (a string), got {type_name(type(name))}"
            checker.problems.append(checker.error(f"preload[{index}]", problem))
        elif name not in names:
            known = ", ".join(sorted(names))
            problem = f"{name!r} is not a configured model (known: {known})"
            checker.problems.append(checker.error(f"preload[{index}]", problem))
        elif raw.index(name) != index:
            checker.problems.append(checker.error(f"preload[{index}]", f"{name!r} is listed twice"))
    return tuple(raw)


def _parse_server(checker: Checker, raw: Any, auth: AuthConfig) -> ServerConfig:
    values = _values(checker, raw, _TABLE["server"])
    # A hook's stderr can carry secrets: keep it out of answers when clients are strangers.
    values.setdefault("expose_hook_errors", not auth.required)
    return ServerConfig(**values)


def _parse_auth(checker: Checker, raw: Any) -> AuthConfig:
    values = _values(checker, raw, _TABLE["auth"])
    keys = list(values.get("api_keys", ()))
    empty = [i for i, api_key in enumerate(keys) if not api_key.strip()]
    if empty:
        problem = "must be a non-empty string"
        raise ConfigError.of([checker.error(f"auth.api_keys[{i}]", problem) for i in empty])
    if "api_keys_file" in values:
        keys += _read_keys_file(checker, values["api_keys_file"])
    return AuthConfig(**values | {"api_keys": tuple(keys)})


def _read_keys_file(checker: Checker, name: str) -> list[str]:
    keys_path = checker.path.parent / name
    try:
        lines = keys_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        problem = f"cannot read {keys_path}: {exc.strerror}"
        raise checker.error("auth.api_keys_file", problem) from None
    except UnicodeDecodeError as exc:
        problem = f"{keys_path} is not UTF-8 text (byte {exc.start})"
        raise checker.error("auth.api_keys_file", problem) from None
    except ValueError:  # a NUL in the name
        raise checker.error("auth.api_keys_file", f"{name!r} is not a file name") from None
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _parse_model(
    checker: Checker, name: str, raw: Any, defaults: dict[str, Any], own_port: int
) -> ModelConfig:
    """One model's table; its independent checks each run, and all its problems are raised
    together (the model is then left out)."""
    key = f"models.{quote_name(name)}"
    if not isinstance(raw, dict):
        raise checker.error(key, "must be a table ([models.NAME])")
    before = len(checker.problems)
    written = set(raw)  # a key of the wrong type is written, not missing
    raw = checker.table(raw, key, _TABLE["models.NAME"].allowed)
    unreadable: set[str] = set()
    driver = _parse_driver(checker, raw, key, unreadable, written)
    port = 0  # chosen by parse_config, once every model's port is known
    if "port" in raw:
        with checker.section():
            port = checker.port(raw["port"], f"{key}.port")
            if port == own_port:
                raise checker.error(f"{key}.port", f"{port} is llmux's own port")
    elif driver["cmd"] is None and not written & {"port", "cmd"}:
        checker.problems.append(
            checker.error(f"{key}.port", "missing (required unless cmd is set)")
        )
    inherited = {}
    for field_name, spec in _INHERITED.items():
        with checker.section():
            value = raw.get(field_name, defaults[field_name])
            inherited[field_name] = checker.spec(spec, value, f"{key}.{field_name}")
    given = [k for k in SIZE_KEYS if k in raw]
    size = raw[given[0]] if given else None
    with checker.section():
        if len(given) > 1:
            raise checker.error(key, "give memory_gb or size, not both")
        if size is not None:
            checker.positive(size, f"{key}.{given[0]}")
    aliases = raw.get("aliases", [])
    for index, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            problem = "must be a non-empty string"
            checker.problems.append(checker.error(f"{key}.aliases[{index}]", problem))
        elif problem := model_name_problem(alias):
            checker.problems.append(checker.error(f"{key}.aliases[{index}]", problem))
    upstream = raw.get("upstream_model")
    if upstream is not None and not upstream.strip():
        checker.problems.append(checker.error(f"{key}.upstream_model", "must not be empty"))
    backend_key = raw.get("backend_api_key")
    if backend_key is not None and (not backend_key.strip() or not backend_key.isprintable()):
        checker.problems.append(checker.error(f"{key}.backend_api_key", "must be a printable key"))
    passthrough: tuple[str, ...] = ()
    with checker.section():
        passthrough = _passthrough_paths(checker, raw.get("passthrough_paths", []), key)
    model = ModelConfig(
        name=name,
        port=port,
        port_chosen=port == 0,
        **driver,
        size=size,
        size_in_gib=given == ["memory_gb"],
        aliases=tuple(dict.fromkeys(a for a in aliases if isinstance(a, str))),
        upstream_model=upstream,
        passthrough_paths=passthrough,
        backend_api_key=backend_key,
        **inherited,
    )
    if len(checker.problems) > before:  # the model is left out, but its hooks still checked
        problems = checker.problems[before:]
        del checker.problems[before:]
        error = ConfigError.of(problems)
        error.partial = replace(model, **dict.fromkeys(unreadable))
        raise error
    return model


def _parse_driver(
    checker: Checker, raw: dict[str, Any], key: str, failed: set[str], written: set[str]
) -> dict[str, Any]:
    """How the model is woken and put to sleep: its shell hooks, or `kind` and/or `cmd`. Each
    problem is kept and the next looked at; `failed` gets the commands that could not be read,
    which `llmux check` then does not look at again."""
    hooks = {hook.value: raw.get(hook.value) for hook in HookName}
    kind, cmd = raw.get("kind"), raw.get("cmd")
    given = [hook for hook, command in hooks.items() if command is not None]
    if (kind is not None or cmd is not None) and given:
        problem = f"{', '.join(given)} given with kind or cmd: give hooks or kind/cmd, not both"
        checker.problems.append(checker.error(f"{key}.{given[0]}", problem))
    for name, command in (*((hook, hooks[hook]) for hook in given), ("cmd", cmd)):
        if command is None:
            continue
        before = len(checker.problems)
        with checker.section():
            checker.hook(command, f"{key}.{name}")
        if len(checker.problems) > before:
            failed.add(name)
    if kind is not None and kind not in KINDS:
        problem = f"unknown kind {kind!r} (known: {', '.join(KINDS)}; or give hooks)"
        checker.problems.append(checker.error(f"{key}.kind", problem))
    if cmd is not None and kind == "ollama":
        problem = "an Ollama server holds several models: run `ollama serve` as its own service"
        checker.problems.append(checker.error(f"{key}.cmd", problem))
    if kind is None and cmd is None and not written & {"kind", "cmd"}:
        for required in (HookName.WAKE.value, HookName.SLEEP.value):
            if hooks[required] is None and required not in written:
                problem = "missing (required unless kind or cmd is set)"
                checker.problems.append(checker.error(f"{key}.{required}", problem))
    level, auto = _sleep_level(checker, raw, key, kind)
    weights = raw.get("weights_gb")
    if weights is not None:
        with checker.section():
            if kind != "vllm":
                raise checker.error(f"{key}.weights_gb", 'only for kind = "vllm"')
            checker.non_negative(weights, f"{key}.weights_gb")
    health = raw.get("health_path")
    if health is not None and not _is_plain_path(health):
        problem = f"{health!r} must be a plain path such as /health"
        checker.problems.append(checker.error(f"{key}.health_path", problem))
    return {
        **hooks,
        "kind": kind,
        "cmd": cmd,
        "sleep_level": level,
        "auto_sleep_level": auto,
        "weights_gb": weights,
        "health_path": health,
    }


def _sleep_level(
    checker: Checker, raw: dict[str, Any], key: str, kind: str | None
) -> tuple[int, bool]:
    """The level a vLLM model sleeps at and whether it is chosen per sleep ("auto"); a
    problem is kept (the level then 1), so the rest of the model is still checked."""
    level = raw.get("sleep_level", 1)
    if "sleep_level" in raw and kind != "vllm":
        checker.problems.append(checker.error(f"{key}.sleep_level", 'only for kind = "vllm"'))
        return 1, False
    if level == "auto":
        return 1, True
    if isinstance(level, bool) or level not in SLEEP_LEVELS:
        problem = f'must be 1, 2 or "auto", got {level!r}'
        checker.problems.append(checker.error(f"{key}.sleep_level", problem))
        return 1, False
    return level, False


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


def _passthrough_paths(checker: Checker, raw: list[Any], key: str) -> tuple[str, ...]:
    """Path prefixes of a backend that /upstream/NAME/... may reach: plain paths only."""
    problems = []
    for index, prefix in enumerate(raw):
        where = f"{key}.passthrough_paths[{index}]"
        if not isinstance(prefix, str):
            problems.append(checker.error(where, "must be a string"))
        elif not _is_plain_path(prefix):
            problem = f"{prefix!r} must be a plain path such as /tokenize (no .., no %, no ?)"
            problems.append(checker.error(where, problem))
    if problems:
        raise ConfigError.of(problems)
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


def quote_name(name: str) -> str:
    """A table's name as its header would write it (a newline in it shown as \\n)."""
    return (
        name
        if name.replace("-", "").replace("_", "").isalnum()
        else json.dumps(name, ensure_ascii=False)
    )
