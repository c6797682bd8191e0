#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it needs, then ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --dev
# The queue tests run against SQLite and a real Redis: they start their own redis-server on a free
# port (tests/queue_helpers.py), so only the binary is needed. Without it they skip, or fail when CI=true.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
    >/dev/null || echo "test.sh: could not install redis-server" >&2
fi
# The browser test drives Debian's Chromium through Playwright (never `playwright install`: no
# browser downloads); fonts-dejavu-core gives meme captions a fallback for Cyrillic/Greek text.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
      fonts-dejavu-core fontconfig; } >/dev/null || echo "test.sh: could not install chromium" >&2
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
ruff check .
python -m pytest -q "$@"
