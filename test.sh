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
export STUDIO_CACHE=${STUDIO_CACHE:-$HOME/.cache/style-studio}  # built models, shared with the app and later runs
ruff check .
lint-imports --no-cache >/dev/null || lint-imports --no-cache  # the layers: quiet when kept, the report when broken
# Build the tiny backbone once (about 1.5 min the first time) before the test processes share it.
python -c "from studio.engine.backbones.tiny import ensure_tiny_flux, ensure_tiny_sd3; ensure_tiny_flux(); ensure_tiny_sd3()" \
  2>/dev/null
# pytest-xdist: one test process more than cores, as a test often waits on the app, the worker or the browser
# it started (measured on 2 cores: 389 s with 3 processes, 448 s with 2). A module's tests stay together so its
# fixtures are built once, and the API and browser modules, which share one running app, form one unit
# (tests/conftest.py's scheduler). xdist hands out the units with the most tests first.
# TEST_WORKERS=N sets the number; TEST_WORKERS=0 runs in this process (for pdb). `./test.sh -m "not slow"` is
# the quick loop.
workers=${TEST_WORKERS:-$(( $(nproc 2>/dev/null || echo 1) + 1 ))}
[ "$workers" = 0 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per test process
python -m pytest -q -n "$workers" --dist loadfile "$@"
