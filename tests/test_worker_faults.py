"""Every fault leaves a way back: one in-process Worker on the tiny backbone meets injected failures
(inside peft's add_adapter, inside a training step, a NaN loss, a full disk, a store that refuses the
template, a LoRA that fails half-loaded) and serves the next job on the same warm model, without a
restart. Jobs are handed to ``Worker.handle`` directly (the Huey consumer is not started), so every
job runs synchronously in the test; recipes are two steps.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from queue_helpers import write_image
from safetensors.torch import load_file, save_file

from studio import cli, diskspace
from studio.engine import training
from studio.engine.backbones import clean
from studio.engine.backbones.flux import FluxBackbone
from studio.engine.recipe import Recipe
from studio.errors import InputError
from studio.jobs.jobs import Jobs
from studio.jobs.queue import Settings
from studio.jobs.records import CANCELLED, DONE, FAILED
from studio.jobs.supervisor import Supervisor
from studio.jobs.worker import Worker
from studio.store import lora_files

pytestmark = pytest.mark.slow  # starts the app or a worker process

FAST = {"steps": 2, "grad_accum": 1, "preview_every": 0, "checkpoint_every": 0, "rank": 4}


def sqlite_settings(root: Path) -> Settings:
    return Settings(runs_dir=root / "runs", store_dir=root / "templates_store", queue_file=root / "runs" / "q.sqlite3",
                    queue_name=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("faults")
    settings = sqlite_settings(root)
    worker = Worker(settings)
    yield SimpleNamespace(settings=settings, jobs=Jobs(settings=settings), worker=worker,
                          image=write_image(root / "ref.png"))
    worker.jobs.queue.close()



def run(env, job_id: str) -> dict:
    """Hand a queued job to the worker (as its queue message would) and return its final status."""
    env.worker.handle(job_id, env.jobs.read(job_id, fresh=True)["token"])
    return env.jobs.status(job_id)


def train(env, name: str = "t", **recipe) -> dict:
    job_id = env.jobs.submit_train([env.image], "red poster", name, recipe={**FAST, **recipe}, backbone="tiny")
    return run(env, job_id)


def generate(env, template_id: str | None, **options) -> dict:
    return run(env, env.jobs.submit_generate(template_id, {"prompt": "a cat", "steps": 2, **options}))


def warm(env):
    """The worker's warm backbone (loading it with a quick training if there is none yet)."""
    if not env.worker.backbones.models():
        assert train(env, "warm-up")["state"] == DONE
    return env.worker.backbones.models()[0]


def assert_clean(env) -> None:
    """The warm model is exactly as loaded: no LoRA layers or peft state, same frozen base weights."""
    backbone = warm(env)
    assert clean.problems(backbone, backbone.clean_state) == []
    assert not [n for n, _ in backbone.transformer.named_modules() if "lora_" in n]


def template_ids(env) -> list[str]:
    return [t.id for t in env.jobs.store.list()]


def assert_template_loads(env, template_id: str) -> None:
    info = env.jobs.store.get(template_id)
    assert lora_files.validate_lora(info.path / "lora.safetensors") == "flux"
    tensors = load_file(info.path / "lora.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())


# -- the warm model survives failures -------------------------------------------------------------


@pytest.mark.parametrize("how", ["flagged", "injected"])
def test_failure_inside_add_adapter_then_training_succeeds(env, monkeypatch, how):
    loads = warm(env) and env.worker.backbones.loads
    real = FluxTransformer2DModel.add_adapter

    def broken_add_adapter(self, config, adapter_name="default"):
        if how == "flagged":  # what `{"rank": true}` did: peft flags the model, then fails creating a layer
            self._hf_peft_config_loaded = True
        else:  # the adapter is fully injected, then something fails before it is activated
            real(self, config, adapter_name)
        raise TypeError("injected failure inside add_adapter")

    monkeypatch.setattr(FluxTransformer2DModel, "add_adapter", broken_add_adapter)
    failed = train(env, f"broken-{how}")
    assert failed["state"] == FAILED and "injected failure inside add_adapter" in failed["error"]
    monkeypatch.undo()
    assert_clean(env)

    done = train(env, f"after-{how}")
    assert done["state"] == DONE, done["error"]
    assert env.worker.backbones.loads == loads  # the same warm model, restored in place: no reload
    assert_template_loads(env, done["template_id"])
    image = generate(env, done["template_id"])  # the new template loads into the warm model and samples
    assert image["state"] == DONE and os.path.getsize(image["outputs"][0]) > 0, image["error"]


def test_failure_inside_a_training_step_then_training_succeeds(env, monkeypatch):
    loads = warm(env) and env.worker.backbones.loads
    real, calls = FluxBackbone.predict_velocity, []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2, half-way: LoRA attached, checkpointing on, encoders offloaded
            raise RuntimeError("injected failure inside a training step")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FluxBackbone, "predict_velocity", failing_step)
    failed = train(env, "step-fails", gradient_checkpointing=True)
    assert failed["state"] == FAILED and "injected failure inside a training step" in failed["error"]
    monkeypatch.undo()
    assert_clean(env)
    assert not getattr(warm(env).transformer, "is_gradient_checkpointing", False)

    done = train(env, "after-step-failure")
    assert done["state"] == DONE, done["error"]
    assert env.worker.backbones.loads == loads
    assert_template_loads(env, done["template_id"])


def test_a_cancelled_training_leaves_a_clean_model(env, monkeypatch):
    real = training.flow_matching_loss
    job_id = env.jobs.submit_train([env.image], "red poster", "cancel-me", recipe={**FAST, "steps": 5},
                                   backbone="tiny")

    def cancel_during_step(*args, **kwargs):
        env.jobs.cancel(job_id)  # the user cancels while step 1 runs
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "flow_matching_loss", cancel_during_step)
    stopped = run(env, job_id)
    monkeypatch.undo()
    assert stopped["state"] == CANCELLED and "cancelled at step 1" in stopped["message"]
    assert_clean(env)
    assert train(env, "after-cancel")["state"] == DONE


def test_a_model_that_cannot_be_restored_is_dropped_and_reloaded(env, monkeypatch):
    backbone = warm(env)
    loads = env.worker.backbones.loads

    def corrupting_step(self, *args, **kwargs):
        weight = next(p for n, p in self.transformer.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            weight.mul_(2.0)  # a base weight changed in place: no clean-up can undo that
        raise RuntimeError("injected corruption")

    monkeypatch.setattr(FluxBackbone, "predict_velocity", corrupting_step)
    assert train(env, "corrupts")["state"] == FAILED
    monkeypatch.undo()
    assert backbone not in env.worker.backbones.models()  # dropped, not reused

    done = train(env, "after-reload")
    assert done["state"] == DONE, done["error"]
    assert env.worker.backbones.loads == loads + 1 and done["timing"]["load_s"] > 0
    assert_clean(env)


# -- NaN never becomes a template -------------------------------------------------------------------


def test_nan_loss_fails_the_job_and_publishes_nothing(env, monkeypatch):
    real, calls = training.flow_matching_loss, []

    def diverging(*args, **kwargs):
        loss, t = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), t) if len(calls) >= 2 else (loss, t)

    monkeypatch.setattr(training, "flow_matching_loss", diverging)
    before = template_ids(env)
    failed = train(env, "diverges", steps=3)
    monkeypatch.undo()
    assert failed["state"] == FAILED
    assert "step 2 of 3" in failed["error"] and "NaN" in failed["error"] and "learning rate" in failed["error"]
    assert template_ids(env) == before
    run_dir = env.jobs.runs_dir / failed["id"]
    assert not (run_dir / "result").exists()
    assert failed["losses"] and len(failed["losses"]) == 1  # step 1 only: the NaN step is not recorded
    assert_clean(env)


def test_a_nan_lora_is_refused_by_the_trainer_and_the_store(env, tmp_path):
    backbone = warm(env)

    class Spoiler(training.Observer):
        def on_step(self, report):  # after the last optimiser step: the LoRA itself turns NaN
            if report.step == report.total:
                with torch.no_grad():
                    next(p for n, p in backbone.transformer.named_parameters() if "lora_" in n).fill_(float("nan"))

    run_dir = tmp_path / "nan-run"
    training.prepare_run(training.TrainRequest([Image.open(write_image(tmp_path / "r.png"))], "red poster", "nan",
                                               Recipe(**FAST)), run_dir, "tiny", "flux", 64)
    with pytest.raises(training.NonFiniteLossError, match="NaN/inf"):
        training.train(backbone, run_dir, Spoiler())
    assert not (run_dir / "result").exists()
    assert clean.problems(backbone, backbone.clean_state) == []

    # The store-level guard: a lora.safetensors with NaN never becomes a template (nor does an import).
    good = env.jobs.store.get(template_ids(env)[0])
    staging = env.jobs.store.new_staging()
    shutil.copytree(good.path, staging, dirs_exist_ok=True)
    tensors = load_file(staging / "lora.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("inf"))
    save_file(tensors, staging / "lora.safetensors")
    before = template_ids(env)
    with pytest.raises(InputError, match="NaN/inf"):
        env.jobs.store.create(staging, "Spoiled")
    assert template_ids(env) == before
    shutil.rmtree(staging)  # create() leaves a refused staging folder to its caller


# -- a full disk ----------------------------------------------------------------------------------


def test_training_is_refused_when_the_disk_is_too_full(env, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 3 * diskspace.MB)
    failed = train(env, "no-room")
    monkeypatch.undo()
    run_dir = env.jobs.runs_dir / failed["id"]
    assert failed["state"] == FAILED
    assert "not enough disk space to train" in failed["error"]
    assert "MB, 3.0 MB free on " + str(run_dir) in failed["error"] and "needs ~" in failed["error"]
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "result").exists()
    assert_clean(env)


def test_a_template_that_cannot_be_saved_is_kept_and_published_later(env, monkeypatch):
    store = env.jobs.store
    real_free = diskspace.free_bytes
    monkeypatch.setattr(diskspace, "free_bytes",
                        lambda path: 0 if Path(path) == store.root else real_free(path))
    failed = train(env, "stranded")
    monkeypatch.undo()
    job_id, result = failed["id"], env.jobs.runs_dir / failed["id"] / "result"
    assert failed["state"] == FAILED and failed["template_id"] is None
    assert f"0.0 MB free on {store.root}" in failed["error"]
    assert f"kept in {result}" in failed["error"] and f"python -m studio jobs publish {job_id}" in failed["error"]
    assert (result / "template.json").is_file() and (result / "lora.safetensors").is_file()
    assert not any(t.meta.get("job_id") == job_id for t in store.list())
    assert not list(store.staging_root.iterdir())  # nothing half-copied

    published = env.jobs.publish_result(job_id)
    assert published["state"] == DONE and published["error"] is None and published["template_id"]
    assert store.get(published["template_id"]).meta["job_id"] == job_id
    assert_template_loads(env, published["template_id"])
    again = env.jobs.publish_result(job_id)  # once only
    assert again["template_id"] == published["template_id"]
    assert [t.meta.get("job_id") for t in store.list()].count(job_id) == 1


def test_a_store_that_fails_on_rename_strands_the_result_and_the_cli_publishes_it(env, monkeypatch, capsys):
    store = env.jobs.store
    real_rename = os.rename

    def no_space(src, dst):
        if Path(dst).parent == store.root:  # publishing only; the run folder's own renames work
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_space)
    failed = train(env, "rename-fails")
    monkeypatch.undo()
    job_id = failed["id"]
    assert failed["state"] == FAILED and "No space left on device" in failed["error"]
    assert "result is kept in" in failed["error"]
    assert not list(store.staging_root.iterdir())

    for key, value in env.settings.env().items():
        monkeypatch.setenv(key, value)
    assert cli.main(["jobs", "publish", job_id]) == 0
    status = env.jobs.status(job_id)
    assert status["state"] == DONE and status["template_id"] in capsys.readouterr().out
    assert cli.main(["jobs", "publish", "no-such-job"]) == cli.EXIT_INPUT
    assert "no job" in capsys.readouterr().err


# -- generations that fail half-way -----------------------------------------------------------------


def two_templates(env) -> list[str]:
    ids = [t.id for t in env.jobs.store.list() if t.backbone == "tiny"][:2]
    while len(ids) < 2:
        ids.append(train(env, f"mixable-{len(ids)}")["template_id"])
    return ids


def test_a_generation_failing_half_way_leaves_no_adapters(env, monkeypatch):
    main, other = two_templates(env)
    real_load, loaded = FluxBackbone.load_lora, []

    def second_lora_fails(self, folder, adapter_name, *args, **kwargs):
        real_load(self, folder, adapter_name, *args, **kwargs)
        loaded.append(adapter_name)
        if len(loaded) == 2:
            raise RuntimeError("injected failure after loading the mixed-in LoRA")

    assert_clean(env)
    monkeypatch.setattr(FluxBackbone, "load_lora", second_lora_fails)
    failed = generate(env, main, mix=[{"template": other, "scale": 0.5}])
    monkeypatch.undo()
    assert failed["state"] == FAILED and "injected failure" in failed["error"]
    assert_clean(env)  # neither the main template's nor the mixed-in LoRA is left loaded

    from studio.engine import fusion

    def fusion_fails(*args, **kwargs):
        raise RuntimeError("injected failure while fusing")

    monkeypatch.setattr(fusion, "fused_generate", fusion_fails)
    failed = generate(env, main, mix=[{"template": other, "scale": 0.5}], fusion_weight=0.5)
    monkeypatch.undo()
    assert failed["state"] == FAILED and "injected failure while fusing" in failed["error"]
    assert_clean(env)

    done = generate(env, main, mix=[{"template": other, "scale": 0.5}], fusion_weight=0.5)
    assert done["state"] == DONE, done["error"]


def test_a_generation_failing_between_training_steps_spares_the_training(env, monkeypatch):
    main, _ = two_templates(env)
    real_load = FluxBackbone.load_lora

    def fails_after_loading(self, folder, adapter_name, *args, **kwargs):
        real_load(self, folder, adapter_name, *args, **kwargs)
        raise RuntimeError("injected failure after loading a LoRA between training steps")

    monkeypatch.setattr(FluxBackbone, "load_lora", fails_after_loading)
    gen = env.jobs.submit_generate(main, {"prompt": "a cat", "steps": 2})
    env.worker._last_inline = 0.0  # serve it at the first step
    trained = train(env, "hosts-a-failed-generation", steps=3)
    monkeypatch.undo()
    served = env.jobs.status(gen)
    assert served["state"] == FAILED and served["timing"]["served_during"] == trained["id"]
    assert trained["state"] == DONE, trained["error"]
    assert_template_loads(env, trained["template_id"])
    assert_clean(env)


# -- leftovers of killed processes ----------------------------------------------------------------


def test_worker_start_cleans_what_killed_processes_left(tmp_path, env):
    settings = sqlite_settings(tmp_path)
    jobs = Jobs(settings=settings)
    store = jobs.store
    good = env.jobs.store.get(template_ids(env)[0])
    shutil.copytree(good.path, store.root / "kept")
    old = time.time() - 2 * 3600

    def aged(path: Path) -> Path:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(p, (old, old))
        return path

    def left(path: Path, text: str = "{") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return aged(path)

    stale_import = store.new_staging()  # an import killed half-way, an hour and more ago
    left(stale_import / "lora.safetensors", "half")
    aged(stale_import)
    fresh_import = store.new_staging()  # maybe being written right now: kept
    stale_tmp = [left(store.root / "kept" / ".template.json.0123456789ab.tmp"),
                 left(store.root / ".index" / "scores" / ".kept.json.0123456789ab.tmp"),
                 left(store.root / ".index" / ".clip-x.npz.0123456789ab.tmp.npz")]
    fresh_tmp = store.root / "kept" / ".template.json.fedcba987654.tmp"
    fresh_tmp.write_text("{")
    own_file = left(store.root / "kept" / "notes.tmp", "mine")  # not a temp name of ours: never touched

    supervisor = Supervisor(jobs, env={"OMP_NUM_THREADS": "1", "STUDIO_HEARTBEAT_S": "0.5"}, stop_timeout=20)
    supervisor.start()
    try:
        assert supervisor.wait_ready(120), supervisor.log_path.read_text()[-3000:]
        assert not stale_import.exists() and fresh_import.exists()
        assert not any(p.exists() for p in stale_tmp)
        assert fresh_tmp.exists() and own_file.exists() and store.get("kept")
    finally:
        supervisor.stop()
        jobs.queue.close()


def test_export_clears_temp_files_of_a_killed_export(env, tmp_path):
    template_id = template_ids(env)[0]
    left = tmp_path / f".{template_id}.zip.0123456789ab.tmp"
    left.write_bytes(b"PK half")
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    out = env.jobs.store.export_zip(template_id, tmp_path)
    assert out.is_file() and not left.exists()

