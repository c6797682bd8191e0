"""The GPU worker as a real process on the tiny backbone, against both queue backends.

One supervised worker per backend serves the whole module (starting one costs seconds); the
tests that kill or restart it come last. Recipes are tiny: a step takes ~0.05 s on a CPU.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from queue_helpers import BACKENDS, make_settings, redis_url, wait_for, write_image  # noqa: F401 (redis_url: a fixture)

from studio.errors import InputError, NotFoundError
from studio.jobs.jobs import Jobs
from studio.jobs.records import CANCELLED, DONE, FAILED, FINAL, QUEUED, RUNNING
from studio.jobs.supervisor import Supervisor
from studio.store import lora_files

pytestmark = pytest.mark.slow  # starts the app or a worker process

FAST = {"steps": 3, "grad_accum": 1, "preview_every": 0, "checkpoint_every": 0, "rank": 4}
# Test-only hook (see studio.jobs.worker._test_oom_hook): step 3 of the job named "oom-me" runs out of memory.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "STUDIO_HEARTBEAT_S": "0.5",
              "STUDIO_TEST_OOM": "oom-me:3"}


@pytest.fixture(scope="module", params=BACKENDS)
def studio(request, tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp(f"studio-{request.param}")
    settings = make_settings(request, request.param, root)
    env = SimpleNamespace(settings=settings, jobs=Jobs(settings=settings), image=write_image(root / "ref.png"))
    env.supervisor = Supervisor(env.jobs, env=WORKER_ENV, stop_timeout=20)
    env.supervisor.start()
    assert env.supervisor.wait_ready(120), read_log(env)
    yield env
    env.supervisor.stop()


def read_log(env) -> str:
    path = env.supervisor.log_path
    return path.read_text()[-4000:] if path.exists() else "(no worker log)"


def train(env, name="t", **recipe):
    return env.jobs.submit_train([env.image], "red poster", name, recipe={**FAST, **recipe}, backbone="tiny")


def wait_final(env, job_id, timeout=90.0) -> dict:
    status = wait_for(lambda: (s := env.jobs.status(job_id))["state"] in FINAL and s, timeout,
                      f"job {job_id} to finish\n{read_log(env)}")
    return status


def wait_step(env, job_id, step, timeout=60.0) -> dict:
    return wait_for(lambda: (s := env.jobs.status(job_id))["step"] >= step and s, timeout,
                    f"job {job_id} to reach step {step}\n{read_log(env)}")



def template_of(env) -> str:
    """Any template in the store (trained by an earlier test), else a quick new one."""
    found = env.jobs.store.list()
    return found[0].id if found else wait_final(env, train(env, "base"))["template_id"]


def metric_steps(env, job_id) -> list[int]:
    lines = (env.jobs.runs_dir / job_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_warm_model_is_reused_across_jobs(studio):
    first, second = train(studio, "warm-1"), train(studio, "warm-2")
    a, b = wait_final(studio, first), wait_final(studio, second)
    assert a["state"] == b["state"] == DONE, (a["error"], b["error"])
    assert a["timing"]["load_s"] > 0 and a["timing"]["backbone_loads"] == 1
    assert b["timing"]["load_s"] == 0 and b["timing"]["backbone_loads"] == 1  # no second load
    assert b["timing"]["first_step_s"] < a["timing"]["first_step_s"]  # time-to-first-step: warm is faster
    assert a["losses"] and len(a["t"]) == 3 and all(0 < t < 1 for t in a["t"])
    template = studio.jobs.store.get(a["template_id"])
    assert template.meta["job_id"] == first and template.name == "warm-1"


def test_cancel_takes_effect_within_one_step(studio):
    job_id = train(studio, "long", steps=2000)
    wait_step(studio, job_id, 3)
    at_cancel = studio.jobs.cancel(job_id)
    assert at_cancel["cancel_requested"]
    status = wait_final(studio, job_id, timeout=30)
    assert status["state"] == CANCELLED and "cancelled at step" in status["message"]
    assert len(metric_steps(studio, job_id)) <= at_cancel["step"] + 1  # the step in flight, no more
    wait_for(lambda: [w["jobs"] for w in studio.jobs.workers()] == [[]], 10, "the worker to be idle again")


def test_out_of_memory_fails_only_its_job(studio):
    pid = studio.supervisor.pid
    doomed, fine = train(studio, "oom-me", steps=6), train(studio, "fine", steps=2)
    a, b = wait_final(studio, doomed), wait_final(studio, fine)
    assert a["state"] == FAILED
    assert a["error"].startswith("out of GPU memory at step 3") and "resolution" in a["error"] and "rank" in a["error"]
    assert b["state"] == DONE, b["error"]
    assert studio.supervisor.pid == pid and studio.supervisor.restarts == 0  # the worker kept serving


def test_generation_is_served_between_training_steps(studio):
    template_id = template_of(studio)
    training = train(studio, "long-2", steps=120)
    wait_step(studio, training, 2)
    gen = studio.jobs.submit_generate(template_id, {"prompt": "a cat", "steps": 2, "num_images": 2})
    g = wait_final(studio, gen, timeout=60)
    t = studio.jobs.status(training)
    assert g["state"] == DONE, g["error"]
    assert t["state"] == RUNNING and t["step"] < 120  # the training was still going
    assert g["timing"]["served_during"] == training and len(g["outputs"]) == 2
    assert all(os.path.getsize(f) > 0 for f in g["outputs"])
    t = wait_final(studio, training, timeout=120)
    assert t["state"] == DONE, t["error"]
    assert metric_steps(studio, training) == list(range(1, 121))  # the pause did not disturb training
    assert g["finished"] <= t["finished"]


def test_concurrent_submissions_complete_exactly_once(studio):
    template_id = template_of(studio)
    # A second worker on the same queue and data folder (a second GPU / host in real life).
    second = subprocess.Popen([sys.executable, "-m", "studio.worker"],
                              env={**os.environ, **studio.settings.env(), **WORKER_ENV}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(studio.jobs.workers()) >= 2, 120, "the second worker")
        ids, errors = [], []

        def submit(i):
            try:
                if i % 2:
                    ids.append(studio.jobs.submit_generate(template_id, {"prompt": f"cat {i}", "steps": 2}))
                else:
                    ids.append(train(studio, f"c{i}", steps=2))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors and len(set(ids)) == 10
        final = [wait_final(studio, job_id, timeout=120) for job_id in ids]
        assert [s["state"] for s in final] == [DONE] * 10, [s["error"] for s in final]
        records = [studio.jobs.read(job_id) for job_id in ids]
        assert all(r["attempts"] == 1 and len(r["history"]) == 1 for r in records)  # each ran exactly once
        published = [t.meta.get("job_id") for t in studio.jobs.store.list()]
        trains = [r["id"] for r in records if r["kind"] == "train"]
        assert sorted(j for j in published if j in trains) == sorted(trains)  # one template per training
        assert len({r["history"][0]["worker"] for r in records}) == 2  # both workers pulled from the one queue
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def test_a_worker_wrongly_taken_for_dead_stops_its_copy(studio):
    job_id = train(studio, "handover", steps=60, checkpoint_every=5)
    wait_step(studio, job_id, 6)
    # What a reconciler on another host does when this worker's heartbeat looks stale.
    studio.jobs.requeue(job_id, "taken for dead", expect_token=studio.jobs.read(job_id)["token"], crashed=True)
    status = wait_final(studio, job_id)
    assert status["state"] == DONE, status["error"]
    record = studio.jobs.read(job_id)
    assert record["attempts"] == 2 and record["history"][0]["outcome"] == "taken for dead"
    assert metric_steps(studio, job_id) == list(range(1, 61))  # the old copy stopped; no step twice
    assert [t.meta.get("job_id") for t in studio.jobs.store.list()].count(job_id) == 1


def test_kill_9_mid_training_resumes_from_checkpoint(studio):
    job_id = train(studio, "survivor", steps=60, checkpoint_every=5)
    wait_step(studio, job_id, 10)
    old_pid = studio.supervisor.pid
    os.kill(old_pid, signal.SIGKILL)
    status = wait_final(studio, job_id, timeout=150)
    assert status["state"] == DONE, status["error"]
    record = studio.jobs.read(job_id)
    assert record["attempts"] == 2 and record["crashes"] == 1
    resumed = record["timing"]["resumed_from"]
    assert resumed >= 5 and resumed % 5 == 0  # from a checkpoint, not from scratch
    assert metric_steps(studio, job_id) == list(range(1, 61))
    template = studio.jobs.store.get(status["template_id"])
    assert lora_files.validate_lora(template.path / "lora.safetensors") == "flux"
    assert template.meta["steps_done"] == 60
    assert studio.supervisor.restarts == 1 and studio.supervisor.pid not in (None, old_pid)


def test_jobs_survive_a_restart_of_the_app(studio):
    running = train(studio, "interrupted", steps=60, checkpoint_every=5)
    wait_step(studio, running, 6)
    studio.supervisor.stop()  # graceful: the training stops at the next step and goes back to the queue
    record = studio.jobs.read(running)
    assert record["state"] == QUEUED and record["crashes"] == 0 and "stopped" in record["message"]
    app = Jobs(settings=studio.settings)
    training = app.submit_train([studio.image], "red poster", "after-restart", recipe=FAST, backbone="tiny")
    gen = app.submit_generate(None, {"prompt": "a cat", "steps": 2})
    app.queue.close()
    del app

    studio.jobs = Jobs(settings=studio.settings)  # the restarted app
    assert [studio.jobs.status(j)["state"] for j in (gen, running, training)] == [QUEUED] * 3
    assert [studio.jobs.status(j)["queue_position"] for j in (gen, running, training)] == [1, 2, 3]
    studio.supervisor = Supervisor(studio.jobs, env=WORKER_ENV, stop_timeout=20)
    studio.supervisor.start()
    assert wait_final(studio, gen)["state"] == DONE
    assert wait_final(studio, training)["state"] == DONE
    resumed = wait_final(studio, running)
    assert resumed["state"] == DONE and resumed["attempts"] == 2 and resumed["timing"]["resumed_from"] >= 5
    assert metric_steps(studio, running) == list(range(1, 61))


# -- the Jobs view's actions (studio.jobs.run_actions) on a real worker ------------------------------


def lora_tensors(template_path):
    from safetensors.torch import load_file

    return load_file(str(template_path / "lora.safetensors"))


def test_a_cancelled_run_resumed_equals_an_uninterrupted_one(studio):
    from studio.jobs import run_actions

    settings = {"steps": 24, "checkpoint_every": 4, "seed": 5}
    job_id = train(studio, "resumable", **settings)
    wait_step(studio, job_id, 6)
    studio.jobs.cancel(job_id)
    cancelled = wait_final(studio, job_id)
    ckpt = cancelled["checkpoint_step"]
    assert cancelled["state"] == CANCELLED and ckpt >= 4 and ckpt % 4 == 0 and ckpt < 24, cancelled
    with pytest.raises(InputError, match="only a cancelled or failed training"):
        run_actions.resume(studio.jobs, train_done := wait_final(studio, train(studio, "done-one"))["id"])
    assert studio.jobs.status(train_done)["state"] == DONE

    queued = run_actions.resume(studio.jobs, job_id)
    assert queued["state"] == QUEUED and "resuming from the checkpoint of step" in queued["message"]
    resumed = wait_final(studio, job_id)
    assert resumed["state"] == DONE, resumed["error"]
    assert metric_steps(studio, job_id) == list(range(1, 25))
    assert studio.jobs.read(job_id)["timing"]["resumed_from"] == ckpt
    straight = wait_final(studio, train(studio, "straight", **settings))
    a = lora_tensors(studio.jobs.store.get(resumed["template_id"]).path)
    b = lora_tensors(studio.jobs.store.get(straight["template_id"]).path)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), "a resumed run must equal one run"


def test_a_failed_runs_checkpoint_is_saved_as_a_template(studio):
    from studio.jobs import run_actions

    job_id = train(studio, "oom-me", steps=6, checkpoint_every=2)  # step 3 runs out of memory (WORKER_ENV)
    failed = wait_final(studio, job_id)
    assert failed["state"] == FAILED and failed["checkpoint_step"] == 2
    saved = wait_final(studio, run_actions.save_checkpoint(studio.jobs, job_id)["id"])
    assert saved["state"] == DONE and "checkpoint of step 2 of 6" in saved["message"], saved
    template = studio.jobs.store.get(saved["template_id"])
    assert template.meta["steps_done"] == 2 and template.meta["job_id"] == job_id
    assert lora_files.validate_lora(template.path / "lora.safetensors") == "flux"
    with pytest.raises(InputError, match="no checkpoint yet"):
        run_actions.save_checkpoint(studio.jobs, cancel_before_checkpoint(studio))


def cancel_before_checkpoint(env) -> str:
    job_id = train(env, "early", steps=400, checkpoint_every=300)
    wait_step(env, job_id, 1)
    env.jobs.cancel(job_id)
    assert wait_final(env, job_id)["state"] == CANCELLED
    return job_id


def test_retry_clone_settings_and_delete(studio):
    from studio.jobs import run_actions

    first = wait_final(studio, train(studio, "to-retry", steps=2))
    again = run_actions.retry(studio.jobs, first["id"])
    assert again != first["id"]
    redone = wait_final(studio, again)
    assert redone["state"] == DONE and redone["request"] == first["request"] and redone["name"] == "to-retry"
    form = run_actions.settings(studio.jobs, again)
    assert form["style_prompt"] == "red poster" and form["recipe"]["steps"] == 2
    assert [os.path.basename(p) for p in form["references"]] == first["request"]["references"]
    running = train(studio, "busy", steps=2000)
    wait_step(studio, running, 1)
    with pytest.raises(InputError, match="cancel it first"):
        run_actions.delete(studio.jobs, running)
    studio.jobs.cancel(running)
    wait_final(studio, running)
    gone = run_actions.delete(studio.jobs, again)
    assert gone["deleted"] == again and gone["freed_bytes"] > 0 and gone["name"] == "to-retry"
    assert not (studio.jobs.runs_dir / again).exists()
    assert studio.jobs.store.get(redone["template_id"])  # the template it made stays
    with pytest.raises(NotFoundError):
        studio.jobs.status(again)
