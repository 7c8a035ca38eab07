"""`llmux top`: a live terminal dashboard built from llmux's own `/metrics`.

It polls the Prometheus text, parses it with prometheus-client's parser, and derives rates and
quantiles over a sliding window (the last WINDOW_SECS of polls) from the difference between the
window's first and last poll, the way Prometheus's `rate()` and `histogram_quantile()` would: a
figure does not flash and vanish between two polls. Switches are stamped with the time llmux
recorded for them (`llmux_switch_last_time_seconds`), not with the time top saw them. The frame
is a pure function of the polls kept and the width, so tests render it on a recorded console.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

TOKEN_ENV = "LLMUX_TOKEN"
STATE_STYLES = {
    "active": "bold green",
    "waking": "yellow",
    "draining": "yellow",
    "sleeping": "yellow",
    "asleep": "dim",
}
BACKOFF = "backoff"  # the state cell of a model whose server failed to start, while it waits
MAX_EVENTS = 5
GIB = 1024**3
WINDOW_SECS = 30.0  # rates, error share and wait percentiles cover this much of the recent past

# The model table's columns in display order, each with its priority: when the terminal is
# narrow, whole columns go, the highest number first, so that no value is ever cut.
COLUMNS = {
    "model": 0, "group": 9, "state": 1, "queue": 2, "infl": 3, "req/s": 4, "err%": 6,
    "wait50": 5, "wait95": 7, "active": 10, "switch": 8,
}  # fmt: skip
COLUMN_GAP = 2  # the padding and the separator between two columns of the table
MODEL_WIDTH = 18  # longer model names end in "…" (the only value shortened)

Labels = tuple[tuple[str, str], ...]


@dataclass
class Poll:
    """One scrape of /metrics: every sample by (name, sorted labels), and when it was taken."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Poll:
        poll = cls(at)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = tuple(sorted(sample.labels.items()))
                poll.samples.setdefault(sample.name, {})[key] = sample.value
        return poll

    def series(self, name: str) -> Iterable[tuple[dict[str, str], float]]:
        for key, value in self.samples.get(name, {}).items():
            yield dict(key), value

    def value(self, name: str, **labels: str) -> float | None:
        for sample_labels, value in self.series(name):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_labels, value in self.series(name)
            if all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def models(self) -> list[str]:
        return list(
            dict.fromkeys(labels["model"] for labels, _ in self.series("llmux_model_state"))
        )

    def groups(self) -> dict[str, list[str]]:
        """Each group's models (from llmux_group_model_info), in exposition order."""
        groups: dict[str, list[str]] = {}
        for labels, _ in self.series("llmux_group_model_info"):
            groups.setdefault(labels["group"], []).append(labels["model"])
        return groups

    def gpu_memory(self, group: str) -> tuple[float, float] | None:
        """(free, total) GiB of the GPUs the group names, as last read; None if it names none
        or one of them could not be read."""
        gpus = [labels["gpu"] for labels, _ in self.series("llmux_group_gpu_info")
                if labels["group"] == group]  # fmt: skip
        free = total = 0.0
        for gpu in gpus:
            one_free = self.value("llmux_gpu_free_bytes", gpu=gpu)
            one_total = self.value("llmux_gpu_total_bytes", gpu=gpu)
            if one_free is None or one_total is None:
                return None
            free, total = free + one_free, total + one_total
        return (free / GIB, total / GIB) if gpus else None

    def state_of(self, model: str) -> str:
        for labels, value in self.series("llmux_model_state"):
            if labels["model"] == model and value == 1:
                return labels["state"]
        return "?"


@dataclass
class Event:
    at: float
    text: str
    style: str = ""


@dataclass
class Dashboard:
    """What `llmux top` remembers between polls: the polls of the window and recent events."""

    url: str
    previous: Poll | None = None
    current: Poll | None = None
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    error: str | None = None
    window: float = WINDOW_SECS
    history: deque[Poll] = field(default_factory=deque)

    def update(self, poll: Poll) -> None:
        self.error = None
        if self.current is not None and _restarted(self.current, poll):
            self.events.append(Event(poll.at, "llmux restarted", "yellow"))
            self.current = None
            self.history.clear()
        self.previous, self.current = self.current, poll
        self.history.append(poll)
        # Keep the newest poll at least `window` old, so the window spans all of it.
        while len(self.history) > 2 and self.history[1].at <= poll.at - self.window:
            self.history.popleft()
        self._record_events()

    @property
    def base(self) -> Poll | None:
        """The poll the window's figures are measured from (None until there are two)."""
        return self.history[0] if len(self.history) > 1 else None

    def unreachable(self, trouble: str) -> None:
        """`trouble` follows llmux's URL: "is unreachable (connection refused)"."""
        self.error = trouble

    def _record_events(self) -> None:
        assert self.current is not None
        now = self.current
        before = self.previous
        switches = []
        for labels, value in now.series("llmux_switch_total"):
            old = before.value("llmux_switch_total", **labels) if before else None
            count = value - (old or 0)
            if count <= 0:
                continue
            result = labels["result"]
            style = "green" if result == "ok" else "red"
            times = f" x{count:g}" if count > 1 else ""
            suffix = " since start" if before is None and count > 1 else ""
            text = f"switch {labels['from']}→{labels['to']} {result}{times}{suffix}"
            # Stamped with the time llmux recorded (an older llmux has none: when top saw it).
            at = now.value("llmux_switch_last_time_seconds", **labels) or now.at
            switches.append(Event(at, text, style))
        self.events.extend(sorted(switches, key=lambda event: event.at))
        for labels, value in now.series("llmux_hook_failures_total"):
            old = before.value("llmux_hook_failures_total", **labels) if before else None
            count = value - (old or 0)
            if count > 0:
                times = f" x{count:g}" if count > 1 else ""
                # A hook or a built-in driver's step: the metric does not say which.
                step = {"alive": "alive check"}.get(labels["hook"], labels["hook"])
                text = f"{step} failed for {labels['model']}{times}"
                self.events.append(Event(now.at, text, "red"))

    def render(self, width: int = 80) -> RenderableType:
        """The frame for a terminal `width` columns wide."""
        parts: list[RenderableType] = [self._header()]
        if self.current is not None:
            parts += [self._model_table(width), self._cost_table(), self._step_lines()]
            parts.append(self._event_lines())
        return Group(*parts)

    def _header(self) -> Text:
        text = Text()
        text.append("llmux top ", style="bold")
        text.append(self.url)
        if self.error is not None or self.current is None:
            trouble = self.error or "has sent no data yet"
            text.append(f"\n{trouble}; retrying", style="bold red")
            return text
        poll = self.current
        started = poll.value("llmux_start_time_seconds")
        uptime = _duration(poll.at - started) if started else "?"
        version = next((labels["version"] for labels, _ in poll.series("llmux_build_info")), "?")
        text.append(f"  v{version}  up {uptime}")
        known = poll.groups()
        groups = known or {"": poll.models()}
        shared = len(groups) == 1 and (poll.value("llmux_group_capacity") or 1) == 1
        for group, members in groups.items():
            text.append("\n")
            if not shared:
                used = poll.value("llmux_group_used", group=group) or 0
                capacity = poll.value("llmux_group_capacity", group=group) or 1
                text.append(f"{group} {used:g}/{capacity:g}  ", style="bold")
            switching = [
                (labels, since)
                for labels, since in poll.series("llmux_switch_in_progress")
                if labels["to"] in members or not known
            ]
            active = [m for m in members if poll.state_of(m) == "active"]
            if switching:
                labels, since = switching[0]
                text.append(
                    f"switching {labels['from']} → {labels['to']} ({_duration(poll.at - since)})",
                    style="bold yellow",
                )
            elif active:
                text.append(f"active {', '.join(active)}", style="bold green")
            else:
                text.append("idle", style="dim")
            memory = poll.gpu_memory(group)
            if memory is not None:
                text.append(f"  GPU {memory[0]:.1f}/{memory[1]:.0f} GiB free", style="cyan")
        return text

    def _model_table(self, width: int) -> RenderableType:
        poll, base = self.current, self.base
        assert poll is not None
        group_of = {model: group for group, ms in poll.groups().items() for model in ms}
        several = len(set(group_of.values())) > 1
        rows = [self._model_row(poll, base, model, group_of) for model in poll.models()]
        headings = [h for h in COLUMNS if h != "group" or several]
        widths = {h: max([len(h), *(len(row[h]) for row in rows)]) for h in headings}
        # Whole columns go, lowest priority first, until the rest fits (with the gaps between).
        while len(headings) > 1 and sum(widths[h] + COLUMN_GAP for h in headings) > width:
            headings.remove(max(headings, key=lambda h: COLUMNS[h]))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for heading in headings:
            justify = "left" if heading in ("model", "group", "state") else "right"
            table.add_column(heading, justify=justify, no_wrap=True, min_width=widths[heading])
        for row in rows:
            cells = [
                Text(row[h], style=_state_style(row[h])) if h == "state" else row[h]
                for h in headings
            ]
            table.add_row(*cells)
        if base is None:
            span = "after the next poll"
        else:
            seconds = poll.at - base.at
            span = (
                f"over the last {seconds:.1f}s"
                if seconds < 10
                else f"over the last {_duration(seconds)}"
            )
        caption = Text(f"req/s, err% and waits {span}", style="dim")
        return Group(table, caption)

    def _model_row(
        self, poll: Poll, base: Poll | None, model: str, group_of: dict[str, str]
    ) -> dict[str, str]:
        """One model's cells, as text, by column heading."""
        since = poll.value("llmux_model_active_since_seconds", model=model) or 0
        last_switch = poll.value("llmux_model_last_switch_duration_seconds", model=model)
        row = {
            "model": _truncate(model, MODEL_WIDTH),
            "group": group_of.get(model, "?"),
            "state": _state(poll, model),
            "queue": f"{poll.value('llmux_request_queue_depth', model=model) or 0:g}",
            "infl": f"{poll.value('llmux_model_in_flight', model=model) or 0:g}",
            "req/s": "-", "err%": "-", "wait50": "-", "wait95": "-",
            "active": _duration(poll.at - since) if since else "-",
            "switch": _seconds(last_switch) if last_switch else "-",
        }  # fmt: skip
        elapsed = (poll.at - base.at) if base else 0.0
        if base is not None and elapsed > 0:
            done = poll.total("llmux_requests_total", model=model) - base.total(
                "llmux_requests_total", model=model
            )
            failed = _errors(poll, model) - _errors(base, model)
            row["req/s"] = f"{done / elapsed:.1f}"
            row["err%"] = f"{100 * failed / done:.0f}" if done > 0 else "0"
            buckets = _bucket_deltas(poll, base, "llmux_request_queue_wait_seconds", model)
            row["wait50"] = _seconds(_quantile(0.50, buckets))
            row["wait95"] = _seconds(_quantile(0.95, buckets))
        return row

    def _cost_table(self) -> RenderableType:
        poll = self.current
        assert poll is not None
        costs = {
            (lb["from"], lb["to"]): v for lb, v in poll.series("llmux_switch_cost_ema_seconds")
        }
        if not costs:
            return Text("switch cost (EMA): no switch measured yet", style="dim")
        models = poll.models()
        rows = ["cold", "idle", *models]  # cold starts, wakes with nothing to put to sleep
        table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        table.add_column("")
        for model in models:
            table.add_column(_truncate(model, 10), justify="right")
        for source in rows:
            cells = [_seconds(costs[(source, t)]) if (source, t) in costs else "·" for t in models]
            if any(cell != "·" for cell in cells):
                table.add_row(_truncate(source, 12), *cells)
        return Group(Text("switch cost EMA: rows from, columns to", style="bold"), table)

    def _step_lines(self) -> RenderableType:
        """Each model's sleeps and wakes, the mean since llmux started, per sleep level: what
        a switch costs is the victims' sleeps plus the target's wake."""
        poll = self.current
        assert poll is not None
        lines = Text()
        for model in poll.models():
            parts = []
            for step in ("sleep", "wake"):
                means = _means(poll, f"llmux_{step}_seconds", model)
                if means:
                    levels = " ".join(f"{_level(level)} {_seconds(s)}" for level, s in means)
                    parts.append(f"{step} {levels}")
            if parts:
                lines.append(f"{_truncate(model, 12):<12} {'   '.join(parts)}\n")
        if not lines:
            return Text()
        lines.rstrip()
        return Group(Text("sleeps and wakes, mean by level", style="bold"), lines)

    def _event_lines(self) -> RenderableType:
        if not self.events:
            return Text("no switches or hook failures yet", style="dim")
        lines = Text()
        for index, event in enumerate(self.events):
            stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
            lines.append(("\n" if index else "") + f"{stamp} ")
            lines.append(event.text, style=event.style)
        return lines


def _state(poll: Poll, model: str) -> str:
    """Its state, or (its `cmd` server failed to start) how long before it is started again:
    requests for it are refused until then, which its state alone would not explain."""
    backoff = poll.value("llmux_model_start_backoff_seconds", model=model) or 0
    return f"{BACKOFF} {_duration(math.ceil(backoff))}" if backoff > 0 else poll.state_of(model)


def _state_style(state: str) -> str:
    return "bold red" if state.startswith(BACKOFF) else STATE_STYLES.get(state, "")


def _restarted(old: Poll, new: Poll) -> bool:
    return (new.value("llmux_start_time_seconds") or 0) != (
        old.value("llmux_start_time_seconds") or 0
    )


def _errors(poll: Poll, model: str) -> float:
    return sum(
        value
        for labels, value in poll.series("llmux_requests_total")
        if labels.get("model") == model and labels.get("status", "").startswith("5")
    )


def _bucket_deltas(
    now: Poll, before: Poll, histogram: str, model: str
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count gained since the previous poll) for one model's histogram."""
    deltas = []
    for labels, value in now.series(histogram + "_bucket"):
        if labels.get("model") != model:
            continue
        old = before.value(histogram + "_bucket", model=model, le=labels["le"]) or 0
        deltas.append((float(labels["le"]), max(0.0, value - old)))
    return sorted(deltas)


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ----- running -----


def base_url(given: str) -> str:
    """llmux's base URL from what a user types: `host:port`, a URL, or the API URL ending in
    `/v1` (what OpenAI clients are given). ValueError, worded for the user, if it is none."""
    text = given.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"{given!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{given!r} is not an http URL of llmux (e.g. http://127.0.0.1:3000)")
    path = url.path.rstrip("/").removesuffix("/v1")
    return str(url.copy_with(path=path or "/", query=None, fragment=None)).rstrip("/")


async def poll_once(client: httpx.AsyncClient, url: str, dashboard: Dashboard) -> None:
    try:
        response = await client.get(url.rstrip("/") + "/metrics")
        response.raise_for_status()
        dashboard.update(Poll.parse(response.text, time.time()))
    except (httpx.HTTPError, ValueError) as exc:
        dashboard.unreachable(_trouble(exc, sent_key="authorization" in client.headers))


def _trouble(exc: Exception, sent_key: bool) -> str:
    """What went wrong, said after llmux's URL; a refusal says how to give the key."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status == 401 and sent_key:
            return f"refuses the API key top sent (HTTP 401; from --token or ${TOKEN_ENV})"
        if status == 401:
            return f"wants one of its API keys (HTTP 401): give it with --token or ${TOKEN_ENV}"
        return f"is unreachable (HTTP {status})"
    if isinstance(exc, httpx.ConnectError):
        return "is unreachable (connection refused)"
    return f"is unreachable ({type(exc).__name__})"


def _client(token: str | None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(5.0))


async def print_once(url: str, interval: float, token: str | None, console: Console) -> bool:
    """Two polls `interval` apart (rates need two), one plain frame; False if unreachable."""
    dashboard = Dashboard(url)
    async with _client(token) as client:
        await poll_once(client, url, dashboard)
        if dashboard.current is None:  # one line: there is no frame to show
            console.print(f"llmux top: {url} {dashboard.error}", soft_wrap=True)
            return False
        await trio.sleep(interval)
        await poll_once(client, url, dashboard)
    console.print(dashboard.render(console.width))
    return dashboard.error is None


async def run_live(url: str, interval: float, token: str | None) -> None:
    """Refresh the screen every `interval` from the trio loop until `q`, Ctrl-C or SIGTERM."""
    dashboard = Dashboard(url)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _client(token) as client, trio.open_nursery() as nursery:
            nursery.start_soon(_quit_on_q, nursery.cancel_scope)
            nursery.start_soon(_quit_on_signal, signals, nursery.cancel_scope)
            await _refresh_forever(client, url, interval, dashboard)


async def _refresh_forever(
    client: httpx.AsyncClient, url: str, interval: float, dashboard: Dashboard
) -> None:
    from rich.live import Live

    with Live(dashboard.render(), screen=True, auto_refresh=False) as live:
        while True:
            await poll_once(client, url, dashboard)
            live.update(dashboard.render(live.console.width), refresh=True)
            await trio.sleep(interval)


async def _quit_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


async def _quit_on_q(scope: trio.CancelScope) -> None:
    if not sys.stdin.isatty():
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        stream = trio.lowlevel.FdStream(os.dup(fd))
        async with stream:
            while True:
                data = await stream.receive_some(64)
                if not data or b"q" in data.lower():
                    scope.cancel()
                    return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _means(poll: Poll, histogram: str, model: str) -> list[tuple[str, float]]:
    """A histogram's mean per `level` label for one model, levels in order (cold last)."""
    counts = {
        labels["level"]: count
        for labels, count in poll.series(histogram + "_count")
        if labels.get("model") == model and count
    }
    sums = {
        labels["level"]: total
        for labels, total in poll.series(histogram + "_sum")
        if labels.get("model") == model and labels["level"] in counts
    }
    order = sorted(sums, key=lambda level: (level == "cold", level))
    return [(level, sums[level] / counts[level]) for level in order]


def _level(level: str) -> str:
    return level if level == "cold" else f"L{level}"
