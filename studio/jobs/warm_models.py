"""What a worker process keeps between jobs and says when memory runs out: the warm model cache
(:class:`WarmBackbones`, one base model loaded once and reused), releasing cached GPU memory after a job,
and the user's message for a job that ran out of GPU memory or is downloading its model."""

from __future__ import annotations

import gc
import logging
import time

from studio.engine.backbones import clean

log = logging.getLogger("studio.jobs.worker")


class WarmBackbones:
    """The process-level model cache: a backbone is loaded once and reused by every later job.

    At most ``max_loaded`` stay loaded (one base model fills a GPU); loading another evicts the oldest.
    Each model's clean state (:func:`studio.engine.backbones.clean.capture`) is recorded when it is loaded,
    so after a failed job the worker can check it is restored, or :meth:`drop` it.
    """

    def __init__(self, max_loaded: int = 1):
        self.loaded: dict[tuple[str, str], object] = {}
        self.max_loaded = max_loaded
        self.loads = 0  # how many times this process loaded a model

    def get(self, backbone_id: str, precision: str = "auto", plan=None, on_download=None):
        """(backbone, seconds spent loading it now: 0.0 when it was warm).

        ``plan`` (a :class:`studio.engine.memory.MemoryPlan`) says how to load it: memory tier and text
        encoder placement. Without one (generation) a warm copy of the backbone is used as it is,
        else it is loaded as :func:`studio.engine.memory.plan_for` picks for generating.
        ``on_download`` gets the progress of a first download from the Hub (see :func:`load_backbone`).
        """
        from studio.engine.backbones import load_backbone

        precision = precision or "auto"
        if plan is None:
            warm = [k for k in self.loaded if k[:2] == (backbone_id, precision)]
            if warm:
                return self.loaded[warm[0]], 0.0
            from studio.engine.memory import plan_for

            plan = plan_for(backbone_id, mode="generate")
        key = (backbone_id, precision, plan.tier.name, plan.text_encoder_placement)
        if key in self.loaded:
            return self.loaded[key], 0.0
        while self.loaded and len(self.loaded) >= self.max_loaded:
            old = next(iter(self.loaded))
            log.info("unloading backbone %s to make room", old[0])
            del self.loaded[old]
            release_memory()
        log.info("loading backbone %s (%s, %s)", backbone_id, precision, plan.describe())
        start = time.perf_counter()
        backbone = load_backbone(backbone_id, precision=precision, on_download=on_download, **plan.load_kwargs())
        backbone.clean_state = clean.capture(backbone)
        self.loads += 1
        self.loaded[key] = backbone
        return backbone, time.perf_counter() - start

    def ids(self) -> list[str]:
        return [key[0] for key in self.loaded]  # keys: (backbone id, precision, tier, offload)

    def models(self) -> list:
        """The loaded backbones."""
        return list(self.loaded.values())

    def drop(self, backbone) -> None:
        """Forget a loaded backbone (the next job that needs it loads it again) and free its memory."""
        for key in [k for k, v in self.loaded.items() if v is backbone]:
            del self.loaded[key]
        release_memory()


def download_message(progress) -> str:
    """A job's message while its model downloads; once done, the loading that follows."""
    return progress.describe() + ("; loading the model" if progress.finished else "")


def release_memory() -> None:
    """Give cached GPU memory back after a job (the LoRA itself is detached by train())."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def oom_message(record: dict, step: int | None = None) -> str:
    """What to tell the user when a job ran out of GPU memory."""
    request = record.get("request") or {}
    if record["kind"] == "train":
        recipe = request.get("recipe") or {}
        at = f" at step {step}" if step else ""
        return (f"out of GPU memory{at}: try a lower resolution (this job: {recipe.get('resolution')} px) "
                f"or a lower LoRA rank (this job: {recipe.get('rank')})")
    options = request.get("options") or {}
    return (f"out of GPU memory while generating: try a lower resolution or size "
            f"(this job: {options.get('width') or options.get('resolution') or 'default'}) or fewer images")
