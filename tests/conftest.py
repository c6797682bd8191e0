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


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random-weight DINO and CLIP folders (the metric models' architectures), built once."""
    from studio.styles.metrics import build_tiny_metric_models

    return build_tiny_metric_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="session")
def metric_env(metric_models) -> dict[str, str]:
    """The environment that points the app and the CLI at the tiny metric models."""
    dino, clip = metric_models
    return {"STUDIO_DINO_MODEL": str(dino), "STUDIO_CLIP_MODEL": str(clip)}


@pytest.fixture(scope="session")
def shared_app(tmp_path_factory, tiny_folder, metric_env):
    """One running app for every API and browser module (see app_helpers.start_shared_app)."""
    from app_helpers import start_shared_app

    from studio.engine.captioner import build_tiny_captioner

    root = tmp_path_factory.mktemp("shared-app")
    app = start_shared_app(root, metric_env, build_tiny_captioner(root / "captioner"))
    yield app
    app.kill()


@pytest.fixture(scope="module")
def app(shared_app):
    """The running app of an API or browser module: the shared app (it has the tiny metric models, the tiny
    captioner and the OOM hook), emptied of the jobs and templates earlier modules made."""
    from app_helpers import empty_studio

    empty_studio(shared_app)
    return shared_app


# The modules that use the shared app (the ``app`` fixture). The scheduler below runs them in one test
# process, so the app starts once; a module that uses it must be listed (checked at collection).
SHARED_APP_MODULES = {"tests/test_app_api.py", "tests/test_captions_browser.py", "tests/test_e2e_browser.py",
                      "tests/test_generate_options.py", "tests/test_refine.py", "tests/test_refine_browser.py",
                      "tests/test_retrieval_app.py"}


def pytest_collection_modifyitems(config, items):
    """A test that stops the shared app (``@pytest.mark.stops_shared_app``) runs last; every module that uses the
    shared app is in SHARED_APP_MODULES."""
    unlisted = {item.nodeid.split("::")[0] for item in items if "app" in item.fixturenames} - SHARED_APP_MODULES
    if unlisted:
        raise pytest.UsageError(f"add {sorted(unlisted)} to SHARED_APP_MODULES in tests/conftest.py")
    items.sort(key=lambda item: item.get_closest_marker("stops_shared_app") is not None)  # stable: order kept


@pytest.hookimpl(optionalhook=True)  # known only with pytest-xdist loaded (not with -p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, except that the shared-app modules form one unit (one test process, one app start).

    Not xdist's ``--dist loadgroup`` with ``xdist_group`` marks: with pytest 9.2 it stops grouping and hands
    out single tests (pytest-dev/pytest-xdist#1386), which splits modules and builds their fixtures twice.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedAppScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "shared-app" if module in SHARED_APP_MODULES else module

    return SharedAppScheduling(config, log)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium through Playwright (one per test process); skipped without it, a failure in CI."""
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
