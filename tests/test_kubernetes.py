"""deploy/kubernetes, checked offline: the manifests against Kubernetes' schemas, the llmux
config they carry by llmux itself, HAProxy's by HAProxy, and a grace period that outlasts the
drain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmux.config import parse_config

FOLDER = Path(__file__).parents[1] / "deploy" / "kubernetes"
MANIFESTS = sorted(FOLDER.glob("*.yaml"))


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((FOLDER / name).read_text()) if d]


def test_the_manifests_are_valid_kubernetes():
    validator = Path(sys.executable).parent / "kubernetes-validate"
    if not validator.exists():
        pytest.skip("kubernetes-validate is not installed (it is in the test extras)")
    checked = subprocess.run(
        [str(validator), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("passed") == sum(len(documents(m.name)) for m in MANIFESTS)


def test_the_config_map_holds_a_config_llmux_accepts_and_the_grace_outlasts_the_drain():
    config_map, daemon_set, _ = documents("llmux.yaml")
    import tomllib

    config = parse_config(
        tomllib.loads(config_map["data"]["config.toml"]), Path("/etc/llmux/config.toml")
    )
    assert set(config.models) == {"llama", "qwen"}
    pod = daemon_set["spec"]["template"]["spec"]
    llmux = next(c for c in pod["containers"] if c["name"] == "llmux")
    pause = int(llmux["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_secs + pause
    assert llmux["readinessProbe"]["httpGet"]["path"] == "/health"
    ports = {c["args"][c["args"].index("--port") + 1] for c in pod["containers"] if "args" in c}
    assert ports == {str(m.port) for m in config.models.values()}


def test_the_front_config_map_is_a_config_haproxy_accepts(tmp_path):
    haproxy = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    config_map = documents("haproxy.yaml")[0]
    (tmp_path / "llmux-models.map").write_text(config_map["data"]["llmux-models.map"])
    text = re.sub(r"/usr/local/etc/haproxy/", f"{tmp_path}/", config_map["data"]["haproxy.cfg"])
    (tmp_path / "haproxy.cfg").write_text(text)
    checked = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
