"""Test set-up: no network, a shared cache for the tiny backbone, small shared fixtures."""

import os
from pathlib import Path

# Before anything imports gradio or huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("STUDIO_CACHE", str(Path.home() / ".cache" / "style-studio"))  # as test.sh and the app

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    """The tiny FLUX-architecture pipeline folder, built once per cache."""
    from studio.engine.backbones.tiny import ensure_tiny_flux

    return ensure_tiny_flux()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_folder):
    """A warm tiny backbone shared by the tests that train or generate."""
    from studio.engine.backbones import load_backbone

    return load_backbone("tiny")


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; skipped without it, a failure in CI."""
    from app_helpers import CHROMIUM, CHROMIUM_ARGS, IN_CI

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("CI must run the browser tests: install playwright (pip) and chromium (apt-get)")
        pytest.skip("playwright or Debian's chromium is not installed (test.sh installs both)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
