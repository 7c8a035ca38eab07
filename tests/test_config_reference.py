"""The config's declarations are the one source of its reference page, example and JSON Schema:
these tests fail when a generated file is stale, when a key the parser accepts is missing from
them, or when the schema and the parser disagree on a value."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest

from llmux import config_docs
from llmux.config import TABLES, ConfigError, load_config, parse_config
from llmux.config_schema import config_schema
from tests.conftest import PYTHON

ROOT = Path(__file__).parents[1]


def test_generated_files_are_fresh():
    for path, text in config_docs.generated().items():
        assert (ROOT / path).read_text(encoding="utf-8") == text, (
            f"{path} is stale: run `python -m llmux.config_docs --write`"
        )
    assert config_docs.main([]) == 0


def test_the_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_docs, "ROOT", tmp_path)
    assert config_docs.main([]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_docs.main(["--write"]) == 0
    assert config_docs.main([]) == 0
    (tmp_path / config_docs.EXAMPLE).write_text("# edited by hand\n")
    assert config_docs.main([]) == 1


def _all_keys() -> set[tuple[str, str]]:
    return {(table.name, spec.name) for table in TABLES for spec in table.keys}


def test_every_key_is_in_the_example_the_reference_and_the_schema(tmp_path):
    example = (ROOT / config_docs.EXAMPLE).read_text()
    reference = (ROOT / config_docs.REFERENCE).read_text()
    schema = config_schema()
    for table, name in _all_keys():
        header = {"models.NAME": "models.llama", "groups.NAME": "groups.gpu0"}.get(table, table)
        if table and name not in ("options",):
            section = example.split(f"[{header}]", 1)[1]
            assert re.search(rf"^#? ?{name} = ", section, re.M), (table, name)
        elif not table:
            assert re.search(rf"^#? ?{name} = |^#? ?\[{name}[.\]]", example, re.M), name
        assert re.search(rf"\| `{name}` \||^## \[{name}[.\]]", reference, re.M), (table, name)
        if table in ("", "models.NAME"):
            properties = schema["properties"]
            if table:
                properties = properties["models"]["additionalProperties"]["properties"]
            assert name in properties, (table, name)


def test_the_example_loads_and_every_table_parses_each_key_it_declares(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("wake-llama.sh", "sleep-llama.sh", "serving-llama.sh"):
        (scripts / name).write_text("#!/bin/sh\n")
    copy = tmp_path / "config.toml"
    copy.write_text((ROOT / config_docs.EXAMPLE).read_text())
    config = load_config(copy)
    assert config.models["llama"].alive == "./scripts/serving-llama.sh"
    assert config.policy.options["guard_factor"] == 2.0
    # Uncommenting every commented key of the example still parses (but the model's hooks,
    # which exclude `kind` and `cmd`): what the example shows is what the parser accepts.
    lines = []
    for line in copy.read_text().splitlines():
        commented = re.match(r"^# (\[[a-z0-9.]+\]$|[a-z_]+ = )", line)
        if commented and not re.match(r"^# (kind|cmd) = ", line):
            line = line[2:]
        lines.append(line)
    text = "\n".join(lines).replace("\nsleep_level = 1\n", "\n")  # vLLM's only
    text = text.replace("\nweights_gb = 16\n", "\n").replace("\nsize = 1\n", "\n")
    text = text.replace(
        'admin_token = "at least 16 characters"', 'admin_token = "0123456789abcdef"'
    )
    (tmp_path / "keys.txt").write_text("sk-2\n")
    copy.write_text(text)
    config = load_config(copy)
    assert config.groups["gpu0"].gpus == (0,) and config.machine.ram_gb == 200
    assert config.auth.api_keys == ("sk-local-1", "sk-2") and config.server.workers == 2


def test_the_schema_accepts_the_example_and_rejects_what_the_parser_rejects(tmp_path):
    validator = jsonschema.Draft202012Validator(config_schema())
    jsonschema.Draft202012Validator.check_schema(config_schema())
    example = tomllib.loads((ROOT / config_docs.EXAMPLE).read_text())
    assert list(validator.iter_errors(example)) == []
    bad_documents = [
        {"port": 70000},
        {"server": {"max_queue_per_model": 0}},
        {"server": {"max_queue_per_modle": 5}},
        {"auth": {"admin_token": "short"}},
        {"policy": {"min_active_secs": -1}},
        {"defaults": {"ttl_secs": "never"}},
        {"machine": {"ram_gb": 0}},
    ]
    model = {"port": 8001, "wake": "true", "sleep": "true"}
    bad_models = [{"kind": "tgi"}, {"sleep_level": 3}, {"aliases": [1]}, {"memory_gb": -1}]
    bad_documents += [{"models": {"a b": model}}, {"models": {"a\x01": model}}]
    bad_documents += [{"models": {"a" * 201: model}}, {"models": {"x\u200by": model}}]
    bad_documents += [{"models": {name: model}} for name in (".", "a/../b", "a//b", "b\\s")]
    bad_models += [{"aliases": ["a b"]}]
    for bad in bad_documents + [{"models": {"a": model | extra}} for extra in bad_models]:
        document = {"models": {"a": model}} | bad
        assert list(validator.iter_errors(document)), bad
        with pytest.raises(ConfigError):
            parse_config(document, tmp_path / "c.toml")
    # What a schema cannot say, the parser does: no number is too large to be a float.
    with pytest.raises(ConfigError, match="must be zero or a positive number, got 1000"):
        parse_config({"models": {"a": model | {"ttl_secs": 10**400}}}, tmp_path / "c.toml")


def test_config_schema_command_prints_the_schema_file():
    result = subprocess.run(
        [PYTHON, "-m", "llmux", "config-schema"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0
    assert json.loads(result.stdout) == config_schema()
    assert result.stdout == (ROOT / config_docs.SCHEMA).read_text()


BROKEN = """
port = 99999
colour = "blue"

[server]
max_queue_per_model = 0
access_log = "yes"

[models.a]
port = 8001
wake = "true"
sleep = "true"
ttl_secs = -5
typo = 1

[models.b]
cmd = "true --port {PORT}"
sleep_level = 2

[models.c]
port = 8003
wake = "true"
sleep = "true"

[groups.g]
models = ["b", "nobody"]

[machine]
ram_gb = 0
"""


def test_check_names_every_problem_of_a_file_at_once(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = [problem.key for problem in caught.value.problems]
    assert keys == [
        "colour", "port", "server.access_log", "server.max_queue_per_model", "models.a.typo",
        "models.a.ttl_secs", "models.b.sleep_level", "groups.g.models", "machine.ram_gb",
    ]  # fmt: skip
    result = subprocess.run(
        [PYTHON, "-m", "llmux", "check", "-c", str(path)], capture_output=True, text=True,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    # `check` also looks at the programs of the models, those with problems included.
    keys.append("models.b.cmd")
    lines = result.stderr.splitlines()
    assert len(lines) == len(keys)
    for line, key in zip(lines, keys, strict=True):
        assert line.startswith(f"llmux: config error: {path}: {key}: "), line
    assert "write ${PORT}" in lines[-1]


def test_a_top_level_key_written_under_a_table_says_where_it_belongs(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[server]\naccess_log = true\nport = 4000\n[models.a]\nport = 9\nwake = "t"\nsleep = "t"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "server.port"
    assert "port is a top-level key: write it above the first [table] header" in str(caught.value)


MODEL = '[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n'


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "llmux", "check", "-c", str(path)], capture_output=True, text=True,
        timeout=20,
    )  # fmt: skip


def test_check_says_each_problem_in_one_line_and_exits_2_whatever_breaks(tmp_path):
    (tmp_path / "loop").symlink_to("loop")  # a path that cannot be resolved
    files = {
        "deep.toml": "x = " + "[" * 5000 + "]" * 5000 + "\n",
        "huge.toml": f"[server]\nmax_body_bytes = {'9' * 400}\n{MODEL}",
        "loop.toml": '[models.a]\ncmd = "sh loop/x.sh --port ${PORT}"\n',
        "newline.toml": '[server]\n"evil\\nllmux: all good" = 1\n' + MODEL,
    }
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        result = _check(path)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("llmux: config error: ") for line in lines), name
        assert "Traceback" not in result.stderr, name
    assert (
        'server."evil\\nllmux: all good": unknown key' in _check(tmp_path / "newline.toml").stderr
    )
    assert "cannot look at its program" in _check(tmp_path / "loop.toml").stderr


def test_serve_warns_of_a_program_it_cannot_look_at_and_starts(tmp_path):
    """`serve` says what `check` refuses, and starts: a script behind a loop of links is a
    warning line, not a crash."""
    from llmux.config import load_config
    from llmux.hook_check import hook_problems

    (tmp_path / "loop").symlink_to("loop")
    path = tmp_path / "config.toml"
    path.write_text('[models.a]\ncmd = "sh loop/x.sh --port ${PORT}"\n')
    problems = hook_problems(load_config(path))
    assert [p.key for p in problems] == ["models.a.cmd"]
    assert "cannot look at its program" in problems[0].problem


def test_a_cmd_on_a_chosen_port_that_never_says_port_is_refused(tmp_path):
    from llmux.hook_check import hook_problems

    path = tmp_path / "config.toml"
    path.write_text(
        '[models.a]\ncmd = "true -m http.server 8000"\n[models.b]\ncmd = "true"\nport = 9\n'
    )
    problems = hook_problems(load_config(path))
    assert [p.key for p in problems] == ["models.a.cmd"]
    assert "never says ${PORT}" in problems[0].problem


def test_a_missing_hook_script_hides_none_of_the_model_s_other_problems(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[models.h1]\nport = 9\nwake = "curl http://127.0.0.1:${PORT}/wake"\n'
        'sleep = "./missing.sh"\nalive = "sh ./nothere.sh"\n'
    )
    lines = _check(path).stderr.splitlines()
    said = {line.split(": ")[3]: line for line in lines}
    assert set(said) == {"models.h1.sleep", "models.h1.wake", "models.h1.alive"}, lines
    assert "missing.sh not found" in said["models.h1.sleep"]  # said once, by the parser
    assert "write ${LLMUX_PORT}" in said["models.h1.wake"]
    assert "sh is given ./nothere.sh" in said["models.h1.alive"]


def test_groups_and_preload_say_every_problem_at_once(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        'preload = ["nope", "a", "a"]\n' + MODEL
        + '[groups.g]\nmodels = ["a", "ghost"]\ncapacity = 0\ngpus = [0, 0]\n'
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [p.key for p in caught.value.problems] == [
        "groups.g.models", "groups.g.capacity", "groups.g.gpus[1]", "models.a", "preload[0]",
        "preload[2]",
    ]  # fmt: skip


def test_second_review_files_each_get_every_problem_once_in_its_own_line(tmp_path):
    (tmp_path / "noexec.sh").write_text("#!/bin/sh\n")
    (tmp_path / "exits.py").write_text("raise SystemExit(0)\n")
    files = {
        "newline_name.toml": (
            '[models."b\\nc"]\nport = 9\nwake = "./noexec.sh"\nsleep = "nosuchprog_zz"\n',
            ['models: ', 'models."b\\nc".wake: ', 'models."b\\nc".sleep: '],
        ),
        "wrong_types.toml": (
            "[models.a]\nport = 9\nwake = 3\nsleep = ['x']\n",
            ["models.a.wake: must be a string", "models.a.sleep: must be a string"],
        ),
        "lists.toml": (
            'preload = ["a", "a", "zz", 1]\n' + MODEL + "[groups.g]\nmodels = [\"a\", \"a\"]\n"
            'gpus = [0, 0, -1, "x"]\n[auth]\napi_keys = ["", " ", "ok"]\n',
            [
                "auth.api_keys[0]: ", "auth.api_keys[1]: ", "groups.g.models: 'a' is listed twice",
                "groups.g.gpus[1]: ", "groups.g.gpus[2]: ", "groups.g.gpus[3]: ",
                "preload[1]: 'a' is listed twice", "preload[2]: 'zz' is not", "preload[3]: must be",
            ],
        ),
        "nul.toml": ('[server]\nstate_dir = "a\\u0000b"\n' + MODEL, ["server.state_dir: cannot"]),
        "policy.toml": (f'[policy]\nname = "{tmp_path}/exits.py:X"\n' + MODEL, ["policy.name: "]),
    }  # fmt: skip
    for name, (text, starts) in files.items():
        path = tmp_path / name
        path.write_text(text)
        result = _check(path)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == len(set(lines)) == len(starts), (name, lines)
        for line, start in zip(sorted(lines), sorted(starts), strict=True):
            assert line.startswith(f"llmux: config error: {path}: {start}"), (name, line)


def test_a_file_the_toml_reader_cannot_take_is_one_config_error(tmp_path):
    """What a reload logs on one line too: no traceback for a file nested too deep, an
    integer of too many digits, or a loop of links."""
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    digits = tmp_path / "digits.toml"
    digits.write_text(f"port = {'9' * 5000}\n")
    (tmp_path / "loop.toml").symlink_to("loop.toml")
    for path, said in (
        (deep, "nested too deep"),
        (digits, "digits"),
        (tmp_path / "loop.toml", "cannot read"),
    ):
        with pytest.raises(ConfigError, match=said):
            load_config(path)
