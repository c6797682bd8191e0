#!/usr/bin/env bash
# Runs the studio on a fresh machine: installs what it needs, then starts it. With no GPU or no
# model weights it runs on the tiny demo backbone and says so.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
. .venv/bin/activate
export GRADIO_ANALYTICS_ENABLED=${GRADIO_ANALYTICS_ENABLED:-False} HF_HUB_DISABLE_TELEMETRY=${HF_HUB_DISABLE_TELEMETRY:-1}
exec python app.py "$@"
