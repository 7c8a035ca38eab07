"""The test suite itself: one Ctrl-C stops it, and its llmux instances never use the user's own
state folder (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from llmux.runtime.instance import config_digest
from tests.conftest import PYTHON, instances_that_wrote

REPO = Path(__file__).parents[1]

INTERRUPTED_RUN = """
import os, signal
import trio

async def test_interrupted_inside_trio():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        os.kill(os.getpid(), signal.SIGINT)
        await trio.sleep(30)

def test_after():
    print("THE NEXT TEST RAN")
"""


def test_one_ctrl_c_inside_trio_stops_the_whole_run(tmp_path):
    (tmp_path / "test_inner.py").write_text(INTERRUPTED_RUN)
    run = subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "tests.conftest", "-o", "trio_mode=true", "-s",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 2, output  # pytest's "interrupted"
    assert "!!! KeyboardInterrupt !!!" in output, output
    assert "THE NEXT TEST RAN" not in output and "failed" not in output, output


def test_the_leak_check_sees_only_this_runs_instances(tmp_path):
    configs = tmp_path / "configs"
    (configs / "t1").mkdir(parents=True)
    ours = configs / "t1" / "config.toml"
    ours.write_text("")
    folder = tmp_path / "real"
    folder.mkdir()
    since = time.time() - 1
    digest = config_digest(ours.resolve())
    expected = [f"config-{digest}.lock", f"running-hooks-{digest}.txt"]
    for name in expected:
        (folder / name).write_text("1\n")
    (folder / "config-0123456789ab.lock").write_text("1\n")  # another llmux's: not this run's
    old = folder / f"port-{digest}.lock"  # written before this run started
    old.write_text("1\n")
    os.utime(old, (since - 100, since - 100))
    assert instances_that_wrote(folder, since, configs) == expected
    assert instances_that_wrote(tmp_path / "missing", since, configs) == []


def test_this_run_points_llmux_at_a_folder_of_its_own(private_state_folder):
    assert os.environ["RUNTIME_DIRECTORY"] == str(private_state_folder)
    assert private_state_folder.stat().st_mode & 0o777 == 0o700
