"""The folders are the layers: the method imports nothing of the web app or the job system."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_method_imports_no_web_or_queue_code():
    loaded = _modules_after("import studio.engine.snr")
    for top in ("gradio", "huey", "redis", "studio.jobs", "studio.ui", "studio.api", "studio.store"):
        assert not any(m == top or m.startswith(top + ".") for m in loaded), f"studio.engine.snr pulled in {top}"


def test_the_engine_imports_no_web_or_queue_code():
    loaded = _modules_after("import studio.engine.training, studio.engine.generation, studio.engine.memory")
    assert not {"gradio", "huey", "redis"} & loaded


@pytest.mark.slow
def test_public_entry_points_still_answer():
    modules = ("studio", "studio.worker", "studio.evaluate")
    procs = [subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for m in modules]  # side by side: each imports torch
    for module, proc in zip(modules, procs, strict=True):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"python -m {module} --help: {err[-2000:]}"
        assert "usage" in out.lower()
