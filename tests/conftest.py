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


# The longest test files first: pytest-xdist hands files out in collection order, so the long ones
# start at once instead of finishing alone at the end (measured with --durations; order only, no skips).
LONGEST_FIRST = ["test_worker.py", "test_e2e_browser.py", "test_app_faults.py", "test_retrieval_app.py",
                 "test_app_api.py", "test_refine_browser.py", "test_refine.py", "test_cli.py", "test_gpu_check.py",
                 "test_worker_faults.py", "test_training.py", "test_generate_options.py", "test_tiny_backbone.py",
                 "test_evaluate.py", "test_download.py", "test_train_step.py", "test_memory.py",
                 "test_memory_phases.py", "test_text_encoder_placement.py", "test_architecture.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
