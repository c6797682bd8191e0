#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it needs, then ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --dev
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
ruff check .
python -m pytest -q "$@"
