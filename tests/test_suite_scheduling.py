"""The suite's own scheduling (tests/conftest.py): the modules that share the running app go to one test process,
every other module stays whole, and the test that stops the shared app runs last."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SHARED_APP_MODULES

HERE = Path(__file__).resolve().parent


def test_shared_app_modules_run_in_one_process_and_the_stopping_test_last(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\nmarkers = ["stops_shared_app: last"]\n')
    body = "import pytest\n\n\n@pytest.fixture\ndef app():\n    return None\n\n\n"
    for module in SHARED_APP_MODULES:
        stem = Path(module).stem
        (tmp_path / module).write_text(body + "".join(f"def test_{i}(app):\n    pass\n\n\n" for i in range(3)) +
                                       ("@pytest.mark.stops_shared_app\ndef test_stop(app):\n    pass\n"
                                        if stem == "test_app_api" else ""))
    for stem in ("test_alpha", "test_beta", "test_gamma"):
        (tests / f"{stem}.py").write_text("".join(f"def test_{i}():\n    pass\n\n\n" for i in range(4)))
    args = ["-v", "-n", "3", "--dist", "loadfile", "-p", "no:cacheprovider", "tests"]
    run = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = re.findall(r"\[(gw\d+)\][^\n]*PASSED (tests/\S+\.py)::(\S+)", run.stdout)
    assert len(ran) == 3 * len(SHARED_APP_MODULES) + 1 + 12
    where = {}
    for worker, module, _ in ran:
        where.setdefault(module, set()).add(worker)
    assert all(len(workers) == 1 for workers in where.values()), where  # no module is split
    assert len(set().union(*(where[m] for m in SHARED_APP_MODULES))) == 1, where  # one process for the app modules
    shared = [(module, name) for _, module, name in ran if module in SHARED_APP_MODULES]
    assert shared[-1] == ("tests/test_app_api.py", "test_stop")  # after every other test that uses the app
