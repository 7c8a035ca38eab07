"""Config validation: every error names the file, the key and the problem."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmux.config import ConfigError, load_config
from tests.conftest import PYTHON

GOOD = """
host = "127.0.0.1"
port = 3000

[server]
max_body_bytes = 1000
shutdown_timeout_secs = 5
expose_hook_errors = false

[policy]
name = "fifo"
request_timeout_secs = 300
drain_before_switch = true
min_active_secs = 2

[defaults]
wake_timeout_secs = 60
alive_interval_secs = 3

[models.llama]
port = 8001
wake = "./wake.sh"
sleep = "echo sleeping"
alive = "true"
wake_timeout_secs = 90

[models."Qwen/Qwen2.5-7B"]
port = 8001
wake = "true"
sleep = "true"
"""


def write(tmp_path, text: str):
    (tmp_path / "wake.sh").write_text("#!/bin/sh\n")
    (tmp_path / "wake.sh").chmod(0o755)
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_a_full_config_loads_with_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.port == 3000 and config.server.max_body_bytes == 1000
    assert config.server.expose_hook_errors is False
    assert config.policy.min_active_secs == 2 and config.policy.request_timeout_secs == 300
    llama = config.models["llama"]
    assert llama.wake_timeout_secs == 90  # per-model override
    assert llama.alive_interval_secs == 3  # from [defaults]
    assert llama.sleep_timeout_secs == 120  # built-in default
    qwen = config.models["Qwen/Qwen2.5-7B"]
    assert qwen.alive is None and qwen.port == 8001  # models may share a port
    assert config.hook_dir == tmp_path.resolve()


def test_minimal_config_uses_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, '[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n'))
    assert (config.host, config.port) == ("127.0.0.1", 3000)
    assert config.policy.name == "adaptive" and config.policy.request_timeout_secs is None
    assert config.policy.drain_before_switch is True
    assert config.server.max_body_bytes == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[models.a]\nport = 9\nwake = "true"\nsleep = "true"\nwaek = "x"\n',
            "models.a.waek",
            "unknown key",
        ),
        ('prot = 1\n[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n', "prot", "unknown key"),
        (
            '[models.a]\nport = "9"\nwake = "true"\nsleep = "true"\n',
            "models.a.port",
            "must be an integer",
        ),
        (
            '[server]\nmax_body_bytes = "big"\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n',
            "server.max_body_bytes",
            "integer",
        ),
        (
            '[policy]\ndrain_before_switch = 1\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n',
            "policy.drain_before_switch",
            "true or false",
        ),
        (
            '[policy]\nrequest_timeout_secs = -1\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n',
            "policy.request_timeout_secs",
            "positive",
        ),
        ('host = "0.0.0.0"\n', "models", "no models"),
        (
            'port = 3000\n[models.a]\nport = 3000\nwake = "t"\nsleep = "t"\n',
            "models.a.port",
            "own port",
        ),
        ('[models.a]\nport = 9\nsleep = "t"\n', "models.a.wake", "missing"),
        ('[models.a]\nport = 9\nwake = "./nope.sh"\nsleep = "t"\n', "models.a.wake", "not found"),
        ('[models.a]\nport = 9\nwake = ""\nsleep = "t"\n', "models.a.wake", "empty"),
        (
            '[defaults]\nwake_timeout_secs = 0\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n',
            "defaults.wake_timeout_secs",
            "positive",
        ),
        ("[models.a\n", "", "invalid TOML"),
        # Built-in drivers: hooks or kind/cmd, each checked.
        ('[models.a]\nport = 9\nkind = "vllm"\nsleep = "t"\n', "models.a.sleep", "not both"),
        ('[models.a]\nport = 9\nkind = "tgi"\n', "models.a.kind", "unknown kind 'tgi'"),
        ('[models.a]\nport = 9\nkind = "ollama"\ncmd = "ollama serve"\n', "models.a.cmd",
         "several models"),
        ('[models.a]\nkind = "vllm"\n', "models.a.port", "required unless cmd"),
        ('[models.a]\ncmd = "./nope.sh"\n', "models.a.cmd", "not found"),
        ('[models.a]\ncmd = "vllm serve"\nsleep_level = 2\n', "models.a.sleep_level", "vllm"),
        ('[models.a]\ncmd = "x"\nkind = "vllm"\nsleep_level = 3\n', "models.a.sleep_level",
         '1, 2 or "auto"'),
        ('[models.a]\ncmd = "x"\nhealth_path = "../admin"\n', "models.a.health_path",
         "plain path"),
        ('[models.a]\nport = 9\nwake = "t"\n', "models.a.sleep", "unless kind or cmd"),
    ],
)  # fmt: skip
def test_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def _llmux(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "llmux", *args], capture_output=True, text=True, timeout=timeout
    )


def test_check_command_reports_ok_and_errors(tmp_path):
    good = write(tmp_path, GOOD)
    result = _llmux("check", "-c", str(good))
    assert result.returncode == 0 and "ok" in result.stdout and "llama" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.a]\nport = 9\nwake = "t"\nsleep = "t"\nextra = 1\n')
    result = _llmux("check", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}: models.a.extra: unknown key" in result.stderr


def test_serve_refuses_bad_config_before_binding(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[policy]\nname = "nope"\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n')
    result = _llmux("serve", "-c", str(bad), "--port", "0")
    assert result.returncode == 2
    assert "policy.name" in result.stderr and "unknown policy" in result.stderr
    assert "listening" not in result.stderr


def test_version_comes_from_package_metadata():
    from importlib.metadata import version

    result = _llmux("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"llmux {version('llmux')}"


def test_unquoted_dotted_model_name_gets_a_hint(tmp_path):
    path = write(tmp_path, '[models.qwen2.5-7b]\nport = 9\nwake = "t"\nsleep = "t"\n')
    with pytest.raises(ConfigError, match=r'must be quoted: \[models."qwen2.5-7b"\]'):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("two words", "whitespace"),
        ("evil\nbackend x", "whitespace"),
        ("tab\there", "whitespace"),
        ("bell\x07", "control"),
        ("zero\u200bwidth", "control"),
        ("m" * 201, "at most 200"),
        ("back\\slash", "backslash"),  # no URL path may hold these (/health/NAME)
        (".", ". or .. part"),
        ("org/../m", ". or .. part"),
        ("org//m", "empty, . or .. part"),
    ],
)
def test_a_model_name_or_alias_that_is_not_one_printable_word_is_refused(tmp_path, name, problem):
    """Such a name would split a line of the front's map or config (see llmux/model_names.py)."""
    hooks = 'port = 9\nwake = "t"\nsleep = "t"\n'
    as_model = write(tmp_path, f"[models.{json.dumps(name)}]\n{hooks}")
    with pytest.raises(ConfigError) as info:
        load_config(as_model)
    assert info.value.key == "models" and problem in info.value.problem
    assert "\n" not in str(info.value)  # one line, the name shown escaped
    as_alias = write(tmp_path, f"[models.a]\n{hooks}aliases = [{json.dumps(name)}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(as_alias)
    assert info.value.key == "models.a.aliases[0]" and problem in info.value.problem


def test_names_with_dots_slashes_and_unicode_still_load(tmp_path):
    hooks = 'port = 9\nwake = "t"\nsleep = "t"\n'
    text = f'[models."a.b"]\n{hooks}aliases = ["org/m:q4", "modèle"]\n'
    config = load_config(write(tmp_path, text + f'[models."{"m" * 200}"]\n{hooks}'))
    assert list(config.models) == ["a.b", "m" * 200]
    assert config.resolve("org/m:q4") == "a.b" and config.resolve("modèle") == "a.b"


def test_hook_scripts_are_found_after_env_assignments(tmp_path):
    ok = write(
        tmp_path, '[models.a]\nport = 9\nwake = "MODEL=/x.gguf A=\'1 2\' ./wake.sh"\nsleep = "t"\n'
    )
    assert load_config(ok).models["a"].wake.endswith("./wake.sh")
    bad = write(tmp_path, '[models.a]\nport = 9\nwake = "MODEL=/x.gguf ./nope.sh"\nsleep = "t"\n')
    with pytest.raises(ConfigError, match=r"nope\.sh not found"):
        load_config(bad)


TWO_MODELS = (
    '[models.a]\nport = 1\nwake = "true"\nsleep = "true"\nmemory_gb = 30\n'
    '[models.b]\nport = 2\nwake = "true"\nsleep = "true"\nmemory_gb = 50\n'
)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[groups.g]\nmodels = ["a", "x"]\n', "groups.g.models", "'x' is not a configured model"),
        ('[groups.g]\nmodels = ["a"]\n[groups.h]\nmodels = ["a"]\n', "groups.h.models",
         "'a' is already in group 'g'"),
        ("[groups.g]\ncapacity = 80\n", "groups.g.models", "missing"),
        ('[groups.g]\ncapacity = 40\nmodels = ["a", "b"]\n', "models.b",
         "size 50 exceeds the capacity 40 of group 'g'"),
        ('[groups.g]\ncapacity = 0\nmodels = ["a"]\n', "groups.g.capacity", "positive"),
        ('preload = ["a", "a"]\n', "preload[1]", "'a' is listed twice"),
        ('preload = ["z"]\n', "preload[0]", "'z' is not a configured model"),
    ],
)  # fmt: skip
def test_bad_groups_and_preload_are_refused(tmp_path, text, key, problem):
    # Top-level keys come before the tables.
    body = text + TWO_MODELS if text.startswith("preload") else TWO_MODELS + text
    with pytest.raises(ConfigError, match=re.escape(problem)) as caught:
        load_config(write(tmp_path, body))
    assert caught.value.key == key


def test_a_capacity_needs_every_member_sized(tmp_path):
    body = (
        TWO_MODELS.replace("memory_gb = 50\n", "")
        + '[groups.g]\ncapacity = 80\nmodels = ["a", "b"]\n'
    )
    with pytest.raises(ConfigError, match="give the model memory_gb or size") as caught:
        load_config(write(tmp_path, body))
    assert caught.value.key == "models.b"


def test_unlisted_models_form_the_default_group(tmp_path):
    config = load_config(
        write(tmp_path, TWO_MODELS + '[groups.g]\ncapacity = 80\nmodels = ["b"]\n')
    )
    assert {name: (g.models, g.capacity) for name, g in config.groups.items()} == {
        "g": (("b",), 80),
        "default": (("a",), None),
    }
    assert config.models["a"].group == "default" and config.models["b"].group == "g"
    result = _llmux("check", "-c", str(tmp_path / "config.toml"))
    assert "group g (capacity 80): b" in result.stdout
    assert "group default (one at a time): a" in result.stdout


def test_groups_name_their_gpus_and_the_default_group_may_too(tmp_path):
    body = TWO_MODELS + '[groups.g]\ngpus = [1, 0]\nmodels = ["b"]\n[groups.default]\ngpus = [2]\n'
    config = load_config(write(tmp_path, body))
    assert config.groups["g"].gpus == (1, 0) and config.groups["default"].gpus == (2,)
    assert config.groups["default"].models == ("a",)  # the unlisted model joined it
    assert config.gpus == (0, 1, 2)
    assert config.server.gpu_margin_gb == 1.0
    result = _llmux("check", "-c", str(tmp_path / "config.toml"))
    assert "group g (one at a time; GPU 1, 0): b" in result.stdout
    assert "group default (one at a time; GPU 2): a" in result.stdout
    plain = load_config(write(tmp_path, "[server]\ngpu_margin_gb = 0\n" + TWO_MODELS))
    assert plain.gpus == () and plain.groups["default"].gpus == ()
    assert plain.server.gpu_margin_gb == 0


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("gpus = [-1]", "groups.g.gpus[0]", "must be GPU indices (integers from 0"),
        ("gpus = [0, true]", "groups.g.gpus[1]", "must be GPU indices"),
        ("gpus = [1.0]", "groups.g.gpus[0]", "must be GPU indices"),
        ('gpus = ["0"]', "groups.g.gpus[0]", "got '0'"),
        ("gpus = 0", "groups.g.gpus", "must be an array, got an integer"),
        ("gpus = [3, 1, 3]", "groups.g.gpus[2]", "GPU 3 is listed twice"),
    ],
)
def test_bad_gpus_are_refused(tmp_path, text, key, problem):
    body = TWO_MODELS + f'[groups.g]\nmodels = ["a"]\n{text}\n'
    with pytest.raises(ConfigError, match=re.escape(problem)) as caught:
        load_config(write(tmp_path, body))
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{tmp_path / 'config.toml'}: {key}: ")


def test_two_groups_cannot_share_a_gpu(tmp_path):
    body = TWO_MODELS + '[groups.g]\nmodels = ["a"]\ngpus = [0, 1]\n'
    body += "[groups.default]\ngpus = [1]\n"
    with pytest.raises(ConfigError, match="GPU 1 is already in group 'g': groups switch") as caught:
        load_config(write(tmp_path, body))
    assert caught.value.key == "groups.default.gpus[0]"


@pytest.mark.parametrize("value", ["-1", '"1"', "nan"])
def test_a_bad_gpu_margin_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"server\.gpu_margin_gb: must be") as caught:
        load_config(write(tmp_path, f"[server]\ngpu_margin_gb = {value}\n" + TWO_MODELS))
    assert caught.value.key == "server.gpu_margin_gb"


MODEL = '[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n'
# Files that once killed llmux on SIGHUP or made `llmux check` print a traceback.
BAD_FILES = {
    "keys file with a non-UTF-8 byte": ('[auth]\napi_keys_file = "keys.txt"\n' + MODEL, "keys"),
    "policy whose constructor raises": ('[policy]\nname = "./p.py:Broken"\n' + MODEL, "policy"),
    "policy module that raises on import": ('[policy]\nname = "./q.py:X"\n' + MODEL, "policy"),
    "group listing a table": (MODEL + '[groups.g]\nmodels = [{name = "a"}]\n', "groups.g"),
    "nan timeout": ("[defaults]\nwake_timeout_secs = nan\n" + MODEL, "wake_timeout_secs"),
    "infinite capacity": (MODEL + 'size = 1\n[groups.g]\ncapacity = inf\nmodels = ["a"]\n', "cap"),
    "hook with a NUL": (MODEL.replace('"true"\nsleep', '"./x\\u0000y"\nsleep'), "models.a.wake"),
    "keys file name with a NUL": ('[auth]\napi_keys_file = "k\\u0000"\n' + MODEL, "api_keys_file"),
}


def _bad_config(tmp_path: Path, name: str) -> Path:
    (tmp_path / "keys.txt").write_bytes(b"sk-good\nsk-\xff\n")
    (tmp_path / "p.py").write_text(
        "class Broken:\n    def __init__(self):\n        raise RuntimeError('no')\n"
    )
    (tmp_path / "q.py").write_text("raise RuntimeError('broken module')\n")
    path = tmp_path / "config.toml"
    path.write_text(BAD_FILES[name][0])
    return path


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_check_refuses_every_malformed_file_with_one_line_and_exit_2(tmp_path, name):
    path = _bad_config(tmp_path, name)
    result = _llmux("check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmux: config error: "), result.stderr
    assert BAD_FILES[name][1] in lines[0]


def test_a_reload_of_any_malformed_file_keeps_the_old_config_and_the_process(fakes, tmp_path):
    import signal
    import time

    import httpx

    from tests.conftest import LlmuxProcess, chat, fake_model_block

    (fake,) = fakes.start("a", wake_delay=0.05)
    good = fake_model_block(fake)
    path = tmp_path / "config.toml"
    path.write_text(good)
    llmux = LlmuxProcess(path)
    try:
        for name in sorted(BAD_FILES):
            _bad_config(tmp_path, name)
            text = BAD_FILES[name][0].replace(MODEL, good)
            path.write_text(text)
            llmux.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            assert llmux.proc.poll() is None, f"a reload of {name} stopped llmux"
            response = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), timeout=10)
            assert response.status_code == 200, name
    finally:
        llmux.stop()
    rest = llmux.log
    assert rest.count("config_rejected") == len(BAD_FILES), rest
    assert "Traceback" not in rest


_SCALARS = (
    st.text(max_size=12)
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.booleans()
    | st.sampled_from(
        ["true", "./missing.sh", "\x00", "fifo", "cost_aware", "adaptive", "a", "default"]
    )
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_VALID = {
    "port": 3000,
    "preload": ["a"],
    "server": {"max_body_bytes": 1000, "state_dir": "state", "list_aliases": True,
               "gpu_margin_gb": 1.5},
    "auth": {"api_keys": ["sk-1"], "admin_token": "0123456789abcdef"},
    "policy": {"name": "cost_aware", "request_timeout_secs": 5, "options": {"quantum_factor": 2}},
    "defaults": {"wake_timeout_secs": 5, "ttl_secs": 3},
    "models": {
        "a": {"port": 9001, "wake": "true", "sleep": "true", "alive": "true", "size": 1,
              "aliases": ["x"], "upstream_model": "m", "passthrough_paths": ["/tokenize"],
              "backend_api_key": "k"},
        "b": {"port": 9002, "wake": "true", "sleep": "true", "memory_gb": 2},
    },
    "groups": {"g": {"capacity": 4, "models": ["a", "b"], "gpus": [0, 1]}},
}  # fmt: skip


def _paths(doc: dict, prefix: tuple = ()) -> list[tuple]:
    found = []
    for key, value in doc.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += _paths(value, (*prefix, key))
    return found


@st.composite
def _mutated_configs(draw: st.DrawFn) -> dict:
    """A valid document with a few values replaced or keys added: deep paths get exercised."""
    import copy

    doc = copy.deepcopy(_VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1] if draw(st.booleans()) else draw(st.sampled_from(["x", "models", "name"]))
        parent[key] = draw(_VALUES)
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_mutated_configs())
def test_any_document_is_a_config_or_a_config_error(tmp_path_factory, raw):
    from llmux.config import parse_config

    path = tmp_path_factory.getbasetemp() / "fuzzed.toml"
    with contextlib.suppress(ConfigError):  # anything else escaping is the failure
        parse_config(raw, path)


def test_check_finds_hooks_that_cannot_run(tmp_path):
    """Each of these parses, and each would fail at its first run: check says so, one line each."""
    (tmp_path / "plain.sh").write_text("#!/bin/sh\n")  # not executable
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/sh\n")
    ok.chmod(0o755)
    config = tmp_path / "hooks.toml"
    config.write_text(
        '[models.a]\nport = 9001\nwake = "./plain.sh"\nsleep = "bash ./missing.sh 2"\n'
        'alive = "no-such-program-here --flag"\n'
        '[models.b]\nport = 9002\nwake = "MODEL=x ./ok.sh"\nsleep = "sh -c \'exit 0\'"\n'
        'alive = "curl -sf http://127.0.0.1:9002/health; exit 1"\n'
    )
    result = _llmux("check", "-c", str(config))
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert "models.a.wake: ./plain.sh is not executable" in lines[0]
    assert "models.a.sleep: bash is given ./missing.sh, which is not found" in lines[1]
    assert "models.a.alive: 'no-such-program-here' is not a shell builtin" in lines[2]


def test_cmd_without_a_port_gets_a_free_one_kept_across_reloads(tmp_path):
    path = write(tmp_path, '[models.a]\ncmd = "x --port ${PORT}"\n[models.b]\ncmd = "y"\n')
    first = load_config(path)
    ports = {name: model.port for name, model in first.models.items()}
    assert 0 not in ports.values() and len(set(ports.values())) == 2
    again = load_config(path).keeping_chosen_ports(first)
    assert {name: model.port for name, model in again.models.items()} == ports
    path.write_text('[models.a]\ncmd = "x --port ${PORT} --new-flag"\n[models.b]\ncmd = "y"\n')
    changed = load_config(path).keeping_chosen_ports(first)
    assert changed.models["b"].port == ports["b"]  # unchanged command: same server, same port
    assert changed.models["a"].cmd.endswith("--new-flag")


def test_check_looks_at_the_program_of_a_cmd(tmp_path):
    config = tmp_path / "cmd.toml"
    config.write_text('[models.a]\ncmd = "no-such-server-here --port ${PORT}"\n')
    result = _llmux("check", "-c", str(config))
    assert result.returncode == 2
    assert "models.a.cmd: 'no-such-server-here' is not a shell builtin" in result.stderr


def test_check_lists_every_problem_of_every_model_and_the_policy_at_once(tmp_path):
    """A port written `{PORT}` reaches the server as that text and fails only at the first
    request; in a hook, even `${PORT}` is empty. All of it, and the policy, in one run."""
    config = tmp_path / "all.toml"
    config.write_text(
        '[policy]\nname = "missing_policy.py:P"\n'
        '[models.a]\ncmd = "no-such-server-here --port {PORT} --name {MODEL}"\n'
        '[models.b]\ncmd = "true --port $PORT --name ${MODEL}"\n'
        '[models.c]\nport = 9003\nwake = "curl -sf http://127.0.0.1:${PORT}/wake"\n'
        'sleep = "curl -sf http://127.0.0.1:{PORT}/sleep"\n'
        'alive = "PORT=9003; curl -sf http://127.0.0.1:$PORT/health ${LLMUX_MODEL}"\n'
    )
    result = _llmux("check", "-c", str(config))
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    expected = [
        "policy.name: policy file ",
        "models.a.cmd: 'no-such-server-here' is not a shell builtin",
        "models.a.cmd: {PORT} reaches the program as written, not as the port; write ${PORT}",
        "models.a.cmd: {MODEL} reaches the program as written, not as the model's name; "
        "write ${MODEL}",
        "models.b.cmd: $PORT is a shell variable, empty unless llmux's environment has it; "
        "write ${PORT}",
        "models.c.wake: ${PORT} is empty in a hook",
        "models.c.sleep: {PORT} reaches the program as written, not as the port; "
        "write ${LLMUX_PORT}",
    ]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(f"llmux: config error: {config}: {start}"), (line, start)


def test_every_path_in_check_and_serve_errors_is_absolute(tmp_path):
    """The config named by a relative path: the policy's error named it as typed."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "c.toml").write_text(
        '[policy]\nname = "nope.py:P"\n[models.a]\nport = 9\nwake = "../w.sh"\nsleep = "t"\n'
        'alive = "sh ../missing.sh"\n'
    )
    (tmp_path / "w.sh").touch()  # found by parsing; not executable
    for command in (["check"], ["serve", "--port", "0"]):
        result = subprocess.run(
            [PYTHON, "-m", "llmux", *command, "-c", "c.toml"],
            cwd=folder, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert result.returncode == 2 and result.stderr, result.stderr
        for line in result.stderr.splitlines():
            assert line.startswith(f"llmux: config error: {folder / 'c.toml'}: "), line
            for path in re.findall(r"(?:policy file|looked at|chmod \+x) (\S+?)[)\s]", line):
                assert path.startswith(str(tmp_path)), line


def test_serve_warns_of_hook_problems_and_starts(tmp_path):
    """A program may appear after llmux starts (a venv installed later): serve says each
    problem check would refuse, and serves on."""
    from tests.conftest import LlmuxProcess

    config = tmp_path / "warn.toml"
    config.write_text(
        '[models.a]\ncmd = "no-such-server-here --port {PORT}"\n'
        '[models.b]\ncmd = "no-such-server-either --port ${PORT}"\n'
    )
    llmux = LlmuxProcess(config)
    try:
        assert llmux.url
    finally:
        assert llmux.stop() == 0
    warnings = [line for line in llmux.lines if "WARNING llmux.config: config warning" in line]
    assert len(warnings) == 3, llmux.log
    assert f"{config}: models.a.cmd: 'no-such-server-here' is not a shell builtin" in warnings[0]
    assert "models.a.cmd: {PORT} reaches the program as written" in warnings[1]
    assert "models.b.cmd: 'no-such-server-either'" in warnings[2]
