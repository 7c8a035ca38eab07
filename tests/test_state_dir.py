"""The state folder and the running-hooks record: only llmux's own folder is used, a planted or
redirected record makes llmux signal nothing it did not start, and a clean exit leaves no record."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmux.runtime.instance import config_digest
from llmux.runtime.state_dir import StateDirError, open_state_dir, state_dir_path
from tests.conftest import PYTHON, LlmuxProcess, fake_model_block, process_running, write_config

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's process")


def test_where_the_folder_is(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert state_dir_path("st", tmp_path) == tmp_path / "st"
    assert state_dir_path(None, tmp_path) == Path("/run/a")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "relative/state")
    assert state_dir_path(None, tmp_path) == Path.cwd() / "relative/state"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert state_dir_path(None, tmp_path) == Path("/run/user/7/llmux")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert state_dir_path(None, tmp_path).name == f"llmux-{os.getuid()}"


def test_a_new_folder_is_private_and_a_shared_or_linked_one_is_refused(tmp_path):
    made = open_state_dir(tmp_path / "new")
    made.close()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateDirError, match="writable by others"):
        open_state_dir(shared)
    (tmp_path / "link").symlink_to(tmp_path / "new")
    with pytest.raises(StateDirError, match="symlink"):
        open_state_dir(tmp_path / "link")


@as_root
def test_a_folder_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StateDirError, match="belongs to uid 65534"):
        open_state_dir(theirs)


def _serve(config: Path, state: Path, **popen) -> LlmuxProcess:
    return LlmuxProcess(config, env={**os.environ, "RUNTIME_DIRECTORY": str(state)}, **popen)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@as_root
def test_a_planted_record_makes_llmux_signal_nothing(fakes, tmp_path):
    (a,) = fakes.start("a")
    config = write_config(tmp_path, fake_model_block(a))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    stranger = subprocess.Popen(  # another user's process group, its start time recorded right
        ["sleep", "60"], start_new_session=True, user=65534
    )
    member = subprocess.Popen(["sleep", "60"])  # in the test's process group, not leading one
    unknown_start = subprocess.Popen(["sleep", "60"], start_new_session=True)
    own = subprocess.Popen(["sleep", "60"], process_group=0)  # will lead llmux's group
    survivors = (stranger, member, unknown_start, own)
    try:
        time.sleep(0.1)
        record = state / f"running-hooks-{config_digest(config.resolve())}.txt"
        record.write_text(
            f"1 {_start_time(1)}\n"  # init: never
            f"{own.pid} {_start_time(own.pid)}\n"  # the group llmux itself runs in
            f"{stranger.pid} {_start_time(stranger.pid)}\n"  # not llmux's user
            f"{member.pid} {_start_time(member.pid)}\n"  # not the leader of its own group
            f"{unknown_start.pid} ?\n"  # a start time nobody can check
            "garbage line\n"
        )
        llmux = _serve(config, state, process_group=own.pid)
        code = llmux.stop()
        for survivor in survivors:
            assert process_running(survivor.pid), survivor.args
        assert code == 0
    finally:
        for p in survivors:
            p.kill()
            p.wait()


def test_records_never_follow_a_symlink_and_a_clean_exit_leaves_none(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    config = write_config(tmp_path, fake_model_block(a, wake=f"sleep 0.5; {a.ctl('wake')}"))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    record = state / f"running-hooks-{config_digest(config.resolve())}.txt"
    record.symlink_to(target)
    llmux = _serve(config, state)
    try:
        response = httpx.post(
            llmux.url + "/v1/chat/completions", json={"model": "a", "messages": []}, timeout=15
        )
        assert response.status_code == 200  # the wake hook ran, so the record was written
    finally:
        code = llmux.stop()
    assert target.read_text() == "keep me\n"
    assert code == 0
    leftovers = sorted(p.name for p in state.iterdir())
    assert not [name for name in leftovers if "running-hooks" in name], leftovers
    assert state.is_dir()  # the folder stays (example hooks keep pid files there)


def test_serve_refuses_a_state_folder_others_may_write(fakes, tmp_path):
    (a,) = fakes.start("a")
    config = write_config(tmp_path, fake_model_block(a))
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    proc = subprocess.run(
        [PYTHON, "-m", "llmux", "serve", "-c", str(config), "--port", "0"],
        capture_output=True, text=True, timeout=15,
        env={**os.environ, "RUNTIME_DIRECTORY": str(state)},
    )  # fmt: skip
    err = proc.stderr
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "writable by others" in lines[0] and str(state) in lines[0]
    assert "listening" not in err
