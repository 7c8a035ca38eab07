"""The `llmux` command line. Heavy imports happen inside each command, so that `fake-ctl` (run
by hooks, often several times a second in tests) and `--version` start fast."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmux import __version__
from llmux.config import DEFAULT_POLICY
from llmux.core.states import HookName

if TYPE_CHECKING:
    from llmux.config import Config, ConfigError
    from llmux.policies.interface import Policy

EXIT_CONFIG_ERROR = 2
TOKEN_ENV = "LLMUX_TOKEN"  # the bearer token `llmux top` sends, when --token is not given


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG_ERROR
    return int(args.handler(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmux",
        description="One OpenAI-compatible endpoint for several model servers on one GPU.",
    )
    parser.add_argument("--version", action="version", version=f"llmux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy with a config file")
    serve.add_argument("-c", "--config", required=True, help="path to config.toml")
    serve.add_argument("--host", help="listen address (overrides the file's host)")
    serve.add_argument("--port", type=int, help="listen port (overrides the file's port)")
    serve.add_argument(
        "--watch-config", action="store_true", help="reload the config when the file changes"
    )
    _add_log_level(serve)
    serve.set_defaults(handler=_serve)

    schema = commands.add_parser(
        "config-schema", help="print the config file's JSON Schema (for editors: #:schema FILE)"
    )
    schema.set_defaults(handler=_config_schema)

    check = commands.add_parser("check", help="validate a config file without starting")
    check.add_argument("-c", "--config", required=True, help="path to config.toml")
    check.set_defaults(handler=_check)

    demo = commands.add_parser("demo", help="run llmux with three built-in fake backends")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=3000)
    _add_log_level(demo)
    demo.set_defaults(handler=_demo)

    top = commands.add_parser("top", help="live dashboard of a running llmux")
    top.add_argument("--url", default="http://127.0.0.1:3000", help="llmux's base URL")
    top.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    top.add_argument("--token", help=f"bearer token for /metrics (or set ${TOKEN_ENV})")
    top.add_argument("--once", action="store_true", help="print one plain frame and exit")
    top.set_defaults(handler=_top)

    sim = commands.add_parser("simulate", help="replay a trace through switch policies")
    sim.add_argument(
        "--trace",
        default="sample",
        help="sample (shipped), onoff (bursty on/off tenants), azure, alibaba, or a CSV",
    )
    sim.add_argument(
        "--traces-dir",
        default="../shared/data/traces",
        help="where azure_llm_2023/ and alibaba_genai_2026/ are",
    )
    sim.add_argument("--top", type=int, default=4, help="alibaba: keep the N most requested models")
    sim.add_argument(
        "--window-hours", type=int, default=12, help="alibaba: the busiest window (0: all)"
    )
    sim.add_argument("--load", type=float, help="thin or compress the trace to this offered load")
    sim.add_argument(
        "--switch-cost", default="10", help="seconds, 'alibaba' (sampled), or a from,to,seconds CSV"
    )
    sim.add_argument("--service", choices=["sequential", "batching"], default="sequential")
    sim.add_argument("--batch", type=int, default=64)
    sim.add_argument("--prefill-rate", type=float, default=5000.0, help="prefill tokens/s")
    sim.add_argument("--step-base", type=float, default=0.020, help="decode step base seconds")
    sim.add_argument(
        "--step-per-sequence",
        type=float,
        default=0.0005,
        help="decode step seconds per running sequence",
    )
    sim.add_argument(
        "--policy",
        nargs="+",
        default=[DEFAULT_POLICY],
        help="policies to compare; fifo and exhaustive always run beside them",
    )
    sim.add_argument(
        "--groups", type=int, default=1, help="GPUs: models dealt round-robin, busiest first"
    )
    sim.add_argument(
        "--capacity", type=float, help="each group's capacity (default: one model at a time)"
    )
    sim.add_argument(
        "--sizes", default="", help="model sizes: name=size,... or uniform:LO-HI (seeded)"
    )
    sim.add_argument("--min-active", type=float, default=0.0, help="policy.min_active_secs")
    sim.add_argument(
        "--costs",
        help="compare sleep depths instead: each step's cost per model and level from this "
        "TOML file, or A / B (the shipped profiles of measured 8B-class models)",
    )
    sim.add_argument(
        "--host-ram",
        type=_finite(positive=True),
        help="with --costs: GiB level-1 sleepers may hold (unlimited)",
    )
    sim.add_argument(
        "--ttl",
        type=_finite(positive=False),
        default=0.0,
        help="with --costs: ttl_secs of every model (0: none)",
    )
    sim.add_argument("--seed", type=int, default=1)
    sim.set_defaults(handler=_simulate)

    fake = commands.add_parser("fake-backend", help="run one fake OpenAI-compatible backend")
    fake.add_argument(
        "--name", default="fake", help="model name it reports (ollama: names, comma-separated)"
    )
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    fake.add_argument("--wake-delay", type=float, default=0.5, help="seconds a wake takes")
    fake.add_argument("--sleep-delay", type=float, default=0.1, help="seconds a sleep takes")
    fake.add_argument("--token-interval", type=float, default=0.02, help="seconds per token")
    fake.add_argument("--awake", action="store_true", help="start awake instead of asleep")
    fake.add_argument(
        "--boot-secs", type=float, default=0.0, help="seconds of loading before it listens"
    )
    fake.add_argument(
        "--weights-mb", type=int, default=0,
        help="vllm: host RAM a level-1 sleep fills (its weights, copied out of the GPU)",
    )  # fmt: skip
    fake.add_argument(
        "--api",
        default="fake",
        choices=["fake", "vllm", "sglang", "ollama"],
        help="also speak this backend's sleep/wake endpoints (to try example hooks)",
    )
    fake.set_defaults(handler=_fake_backend)

    front = commands.add_parser(
        "haproxy", help="write an HAProxy config that routes by model to several llmux boxes"
    )
    front.add_argument(
        "boxes", nargs="+", metavar="NAME=URL", help="e.g. box1=http://10.0.0.1:3000"
    )
    front.add_argument("--api-key", help=f"a key the boxes accept (or set ${TOKEN_ENV})")
    front.add_argument("--out", default=".", help="folder for haproxy.cfg and llmux-models.map")
    front.add_argument(
        "--map-path", help="where haproxy will read the map (default: its path in --out)"
    )
    front.add_argument("--bind", default=":8080", help="HAProxy's listen address")
    front.add_argument(
        "--check-interval",
        default="1s",
        help="health checks per server, in HAProxy time (1s, 300ms)",
    )
    front.set_defaults(handler=_haproxy)

    worker = commands.add_parser("_worker")  # started by `llmux serve`: no help line
    worker.add_argument("--listen-fd", type=int, required=True)
    worker.add_argument("--channel-fd", type=int, required=True)
    _add_log_level(worker)
    worker.set_defaults(handler=_worker)

    ctl = commands.add_parser("fake-ctl", help="hook helper: wake, sleep or probe a fake backend")
    ctl.add_argument("action", choices=[str(hook) for hook in HookName])
    ctl.add_argument("--port", type=int, required=True)
    ctl.add_argument("--host", default="127.0.0.1")
    ctl.add_argument("--timeout", type=float, default=30.0)
    ctl.set_defaults(handler=_fake_ctl)
    return parser


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object per line"
    )


def _setup_logging(args: argparse.Namespace) -> None:
    from llmux.observe.logs import setup_logging

    setup_logging(args.log_level, args.log_format)


def _ignore_late_signals() -> None:
    """Outside llmux's own signal receiver (which is open from start-up to the end of the
    graceful shutdown) SIGTERM and SIGINT are ignored: the one-file binary's bootloader forwards
    a signal the child got already, so a second one often arrives after llmux has drained and
    is on its way out, and must not turn a clean exit into a crash."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _load_config(path: str) -> Config | None:
    """The config; None, its problem printed, when the file cannot be used."""
    from llmux.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem of the file, one line each
            print(f"llmux: config error: {problem}", file=sys.stderr)
    except Exception as exc:
        _unforeseen(path, exc)
    return None


def _unforeseen(path: str, exc: Exception) -> None:
    """A file we failed to foresee: still one line (and exit 2 from the caller)."""
    where = os.path.abspath(path)
    print(f"llmux: config error: {where}: cannot use this file: {exc!r}", file=sys.stderr)


def _load_policy(config: Config) -> tuple[Policy | None, ConfigError | None]:
    """The config's policy, or the problem that keeps it from being built."""
    from llmux.config import ConfigError
    from llmux.policies.loader import PolicyLoadError, load_policy

    try:
        return load_policy(config.policy.name, config.policy.options, config.hook_dir), None
    except PolicyLoadError as exc:
        return None, ConfigError(config.path, "policy.name", str(exc))
    except (Exception, SystemExit) as exc:  # the operator's code: whatever it raises, one line
        return None, ConfigError(config.path, "policy.name", f"cannot use it: {exc!r}")


def _config_schema(args: argparse.Namespace) -> int:
    from llmux.config_schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def _check(args: argparse.Namespace) -> int:
    from llmux.config import ConfigError, load_config
    from llmux.hook_check import hook_problems

    problems: list[ConfigError] = []
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # Every problem at once: the file's, then the hooks and policy of what did parse.
        problems, config = list(exc.problems), exc.partial
    except Exception as exc:
        _unforeseen(args.config, exc)
        return EXIT_CONFIG_ERROR
    if config is not None:
        _, policy_problem = _load_policy(config)
        problems += [policy_problem] if policy_problem else []
        problems += hook_problems(config)
    for problem in problems:
        print(f"llmux: config error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG_ERROR
    names = ", ".join(config.models)
    print(f"{config.path}: ok ({len(config.models)} models: {names}; policy {config.policy.name})")
    groups = config.groups.values()
    if len(groups) > 1 or any(g.capacity is not None or g.gpus for g in groups):
        for group in groups:
            room = f"capacity {group.capacity:g}" if group.capacity else "one at a time"
            if group.gpus:
                room += f"; GPU {', '.join(map(str, group.gpus))}"
            print(f"  group {group.name} ({room}): {', '.join(group.models)}")
    return 0


def _warn_of_hook_problems(config: Config) -> None:
    """What `llmux check` refuses, `serve` only says: a program may appear after llmux starts
    (a venv installed later, a mount not up yet), and one that is still missing fails its
    model's wake with its own message."""
    import logging

    from llmux.hook_check import hook_problems
    from llmux.observe.logs import log_event

    log = logging.getLogger("llmux.config")
    for problem in hook_problems(config):
        log_event(log, "config_warning", f"config warning: {problem}", logging.WARNING,
                  key=problem.key)  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from functools import partial

    import trio

    from llmux.config import ConfigError
    from llmux.runtime.instance import InstanceError
    from llmux.runtime.state_dir import StateDirError
    from llmux.server import serve_forever, start_instance

    _setup_logging(args)
    config = _load_config(args.config)
    if config is None:
        return EXIT_CONFIG_ERROR
    policy, policy_problem = _load_policy(config)
    if policy_problem is not None:
        print(f"llmux: config error: {policy_problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.port is not None and args.port in {m.port for m in config.models.values()}:
        err = ConfigError(config.path, "--port", f"{args.port} is a model's backend port")
        print(f"llmux: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    _warn_of_hook_problems(config)
    config = config.with_listen(args.host, args.port)
    try:
        # The state folder, both instance locks and the port, before anything runs.
        instance = start_instance(config)
    except (StateDirError, InstanceError) as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    _ignore_late_signals()
    trio.run(
        partial(serve_forever, config, policy, watch_config=args.watch_config, instance=instance)
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    import trio

    from llmux.runtime.instance import InstanceError
    from llmux.runtime.state_dir import StateDirError
    from llmux.testing.demo import run_demo

    _setup_logging(args)
    _ignore_late_signals()
    refused: list[BaseException] = []
    try:
        trio.run(run_demo, args.host, args.port)
    except* (InstanceError, StateDirError) as group:  # raised inside the demo's nursery
        refused += group.exceptions
    if refused:
        print(f"llmux: {refused[0]}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


def _top(args: argparse.Namespace) -> int:
    import shutil

    import trio
    from rich.console import Console

    from llmux.observe.top import base_url, print_once, run_live

    try:
        url = base_url(args.url)
    except ValueError as exc:
        print(f"llmux top: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    token = args.token or os.environ.get(TOKEN_ENV)
    if args.once:
        # The terminal's width; 80 into a pipe or a file, so that scripts see one shape.
        width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80
        console = Console(color_system=None, width=width, soft_wrap=False)
        reachable = trio.run(print_once, url, args.interval, token, console)
        return 0 if reachable else 1
    trio.run(run_live, url, args.interval, token)
    return 0


def _finite(positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number, > 0 or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"a finite number {'> 0' if positive else '>= 0'} is expected, not {text!r}"
            )
        return value

    return parse


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmux.policies.loader import PolicyLoadError
    from llmux.sim import simulate, traces
    from llmux.sim.simulator import ServiceModel, StrandedRequests

    service = ServiceModel(
        args.service, args.batch, args.prefill_rate, args.step_base, args.step_per_sequence
    )
    folder = Path(args.traces_dir)
    try:
        requests = simulate.load_trace(args.trace, args.top, folder, args.window_hours, service)
    except simulate.TraceMissing as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileNotFoundError as exc:
        print(f"llmux: cannot read the trace: {exc} (see --traces-dir)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.load is not None:
        requests = traces.scale_to_load(requests, args.load, service, args.seed)
    load = traces.offered_load(requests, service)
    models = sorted({r.model for r in requests})
    print(
        f"{len(requests)} requests, {len(models)} models, offered load {load:.2f} ({service.kind})"
    )
    if args.costs is not None:
        return _simulate_depths(args, requests, service)
    costs = simulate.cost_factory(args.switch_cost, folder, args.seed)
    try:
        layout = simulate.layout_from(
            simulate.by_demand(requests), args.groups, args.capacity, args.sizes, args.seed
        )
    except ValueError as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if layout.sizes and args.capacity is not None:
        sizes = ", ".join(f"{m} {s:g}" for m, s in layout.sizes.items())
        print(f"capacity {args.capacity:g} per group; sizes: {sizes}")
    try:
        summaries = simulate.compare(
            requests, args.policy, costs, service, args.min_active, layout=layout
        )
    except (PolicyLoadError, StrandedRequests) as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return 1
    print(simulate.render(summaries))
    return 0


def _simulate_depths(args: argparse.Namespace, requests: list, service: object) -> int:
    """`--costs`: the four depth choices under the first policy named."""
    from pathlib import Path

    from llmux.policies.loader import PolicyLoadError, load_policy
    from llmux.sim import simulate
    from llmux.sim.simulator import StrandedRequests
    from llmux.sim.tier_costs import CostsFileError, load_costs

    if args.groups != 1:
        print("llmux: --costs simulates one group (host RAM is the machine's)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        costs = load_costs(args.costs)
        layout = simulate.layout_from(
            simulate.by_demand(requests), 1, args.capacity, args.sizes, args.seed
        )
    except (CostsFileError, ValueError) as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    policy = args.policy[0]
    strangers = sorted(set(costs.models) - {r.model for r in requests})
    if strangers:
        print(f"note: the costs file names models the trace does not have: {', '.join(strangers)}")
    try:
        summaries = simulate.compare_depths(
            requests, lambda: load_policy(policy, {}, Path(".")), costs, service,  # type: ignore[arg-type]
            args.host_ram, args.ttl, args.min_active, layout,
        )  # fmt: skip
    except (PolicyLoadError, StrandedRequests) as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return 1
    print(
        f"policy {policy}, ttl {args.ttl:g} s, host RAM "
        + ("unlimited" if args.host_ram is None else f"{args.host_ram:g} GiB")
    )
    print(simulate.render_depths(summaries, costs))
    return 0


def _fake_backend(args: argparse.Namespace) -> int:
    import signal

    import trio

    from llmux.testing.fake_backend import FakeBackend, FakeOllama, serve_fake_backend

    options = {
        "wake_delay": args.wake_delay,
        "sleep_delay": args.sleep_delay,
        "token_interval": args.token_interval,
        "awake": args.awake,
    }
    if args.api == "ollama":
        backend: FakeBackend | FakeOllama = FakeOllama(args.name.split(","), **options)
    else:
        backend = FakeBackend(args.name, api=args.api, weights_mb=args.weights_mb, **options)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(args.boot_secs):  # loading its weights
                    async for _ in signals:
                        return
                urls = await nursery.start(serve_fake_backend, backend, args.host, args.port)
                print(f"fake-backend {args.name} listening on {urls[0]}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0


def _haproxy(args: argparse.Namespace) -> int:
    from pathlib import Path

    import httpx

    from llmux.fronts.haproxy import fetch_box, haproxy_config, parse_boxes

    try:
        specs = parse_boxes(args.boxes)
    except ValueError as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    key = args.api_key or os.environ.get(TOKEN_ENV)
    boxes = []
    for name, url in specs.items():
        try:
            boxes.append(fetch_box(name, url, key))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"llmux: {name} ({url}): cannot read what it serves: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    map_path = args.map_path or str((out / "llmux-models.map").resolve())
    try:
        config, mapping = haproxy_config(
            boxes, map_path=map_path, bind=args.bind, check_interval=args.check_interval
        )
    except ValueError as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    (out / "haproxy.cfg").write_text(config)
    (out / "llmux-models.map").write_text(mapping)
    served = sorted({m for box in boxes for m in box.models})
    print(f"wrote {out / 'haproxy.cfg'} and {out / 'llmux-models.map'}: {len(served)} models "
          f"on {len(boxes)} boxes")  # fmt: skip
    return 0


def _worker(args: argparse.Namespace) -> int:
    from llmux.workers.worker import worker_main

    _setup_logging(args)
    return worker_main(args.listen_fd, args.channel_fd)


def _fake_ctl(args: argparse.Namespace) -> int:
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    method, path = {
        HookName.WAKE: ("POST", "/fake/wake"),
        HookName.SLEEP: ("POST", "/fake/sleep"),
        HookName.ALIVE: ("GET", "/fake/alive"),
    }[HookName(args.action)]
    url = f"http://{args.host}:{args.port}{path}"
    request = Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode(errors="replace"))
            return 0
    except HTTPError as exc:
        print(f"{args.action}: {url} answered {exc.code}", file=sys.stderr)
    except (URLError, OSError) as exc:
        print(f"{args.action}: cannot reach {url}: {exc}", file=sys.stderr)
    return 1
