"""benchmarks/gpu_check.py: the smoke run on the CPU prints every table; the in-memory build and the budget."""

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HEADERS = [
    "# GPU check - ",
    "## Build (in memory, random weights)",
    "## Text encoders: one prompt",
    "## Training: seconds per optimiser step",
    "## Peak memory per phase (GiB)",
    "## Generation and LoRA swaps (warm pipeline)",
    "## torch.compile of the transformer blocks",
    "## Skipped and notes",
]


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[object]:
    """The script as a module; afterwards this process's sys.path and sys.modules are as before, for the
    other modules it runs."""
    path, fresh = list(sys.path), "bench_train" not in sys.modules
    with pytest.MonkeyPatch.context() as mp:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    for entry in (str(ROOT), str(SCRIPT.parent)):  # the script and bench_train put these first on sys.path
        while sys.path.count(entry) > path.count(entry):
            sys.path.remove(entry)  # the first one: an entry that was there before stays
    if fresh:
        sys.modules.pop("bench_train", None)


@pytest.fixture()
def script_state(monkeypatch) -> Iterator[None]:
    """What a run of the script in this process changes, given back to later tests: sys.argv, the torch
    thread count (it sets one), the global RNG and torch.compile's caches (its compile section)."""
    import torch._dynamo  # the compile section imports it anyway

    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])  # its parser's usage line names the script
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # its compiled tiny blocks must not count against another test's recompile limit


@pytest.mark.slow  # about a minute on two cores
def test_smoke_run_prints_every_table(gpu_check, tiny_folder, capfd, script_state):
    # In this process: `python benchmarks/gpu_check.py` is `sys.exit(main())`, and a second interpreter
    # would only add ~10 CPU-seconds of imports. The script sets one torch thread itself on the CPU, as
    # OMP_NUM_THREADS=1 did; conftest.py set HF_HUB_OFFLINE.
    # Two tiers (plain and quantised) at one size keep it short; the other tiers' builds are tested below
    # and their training in tests/test_memory.py.
    code = gpu_check.main(["--tiny", "--tiers", "bf16,nf4", "--sizes", "64", "--steps", "2", "--warmup", "1"])
    out, err = capfd.readouterr()
    assert code == 0, err[-4000:]
    for header in HEADERS:
        assert header in out, header
    assert "not a GPU: smoke run" in out
    assert "failed," not in out, out.split("## Skipped and notes")[-1]  # no section failed
    # every table got its rows: a tier's training, a phase, the generation, the compile verdict
    assert "| bf16 | 64 | full-precision base weights |" in out
    assert "| bf16 | 64 | train |" in out
    assert "| one image, 28 steps at " in out
    assert "| load a template LoRA (load_lora_weights) | bf16 |" in out
    assert "| bf16 | 64 | eager |" in out
    assert "| cpu | float32 | cpu-fp32 (last resort) |" in out


def test_budget_skips_a_section_that_would_not_fit(gpu_check):
    budget = gpu_check.Budget(100.0, start=time.perf_counter())
    assert budget.allows("small", 10.0)
    assert not budget.allows("large", 200.0)
    assert not budget.allows("kept back", 60.0, reserve_s=50.0)
    assert budget.allows("quiet", 500.0, quiet=True) is False
    assert len(budget.notes) == 2
    assert budget.notes[0].startswith("large: skipped, it needs ~200 s")
    assert "50 s kept for the remaining tiers" in budget.notes[1]


def test_quantised_transformer_is_built_in_memory(gpu_check, tiny_folder):
    import torch
    from optimum.quanto import QLinear

    spec = gpu_check.tiny_spec()
    plain = gpu_check.build_transformer(spec, torch.device("cpu"), torch.float32, None)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    quantised = gpu_check.build_transformer(spec, torch.device("cpu"), torch.float32,
                                            gpu_check.quanto_quantiser("int8"))
    assert sum(type(m) is torch.nn.Linear for m in quantised.modules()) == 0
    assert sum(isinstance(m, QLinear) for m in quantised.modules()) == linears
    assert not any(p.is_meta for p in quantised.parameters())
    assert not any(p.requires_grad for p in quantised.parameters())


def test_t5_keeps_its_tied_embedding(gpu_check, tiny_folder):
    import torch

    t5 = gpu_check.build_t5(gpu_check.tiny_spec(), torch.device("cpu"), torch.float32)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert torch.isfinite(t5.shared.weight).all() and t5.shared.weight.std() > 0
