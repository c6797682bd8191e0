"""The files of a training run that must survive a crash: checkpoints (the LoRA weights and Adam's state
every N steps, safetensors, no pickle, replaced atomically and found again after a crash between two
renames), the metric lines a resumed run drops (written after the checkpoint it goes on from), and the
run folder's atomic JSON writes. The training loop is :mod:`studio.engine.training`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER = "studio_train"  # the trainable LoRA's adapter name (studio.engine.training uses the same)


def save_checkpoint(run_dir: Path, transformer, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write LoRA weights and Adam state (safetensors, no pickle), replacing the old checkpoint atomically."""
    tmp = run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    save_file({k: v.detach().float().contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
    state = optimizer.state_dict()["state"]
    tensors = {f"{i}.{key}": torch.as_tensor(value).reshape(-1).float().contiguous()
               if key == "step" else value.contiguous()
               for i, slots in state.items() for key, value in slots.items()}
    save_file(tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "state.json", {"step": step})
    final = run_dir / "checkpoint"
    old = run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_folder(run_dir: Path) -> Path | None:
    """The run's latest complete checkpoint folder, or None."""
    for folder in (run_dir / "checkpoint", run_dir / "checkpoint.old"):  # .old: crashed between the two renames
        if (folder / "state.json").exists():
            return folder
    return None


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0: none)."""
    folder = checkpoint_folder(run_dir)
    try:
        return int(json.loads((folder / "state.json").read_text())["step"]) if folder else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def load_checkpoint(run_dir: Path, transformer, optimizer: torch.optim.Optimizer) -> int:
    """Restore the latest checkpoint if there is one; return the step it was taken at."""
    folder = checkpoint_folder(run_dir)
    if folder is None:
        return 0
    step = json.loads((folder / "state.json").read_text())["step"]
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(transformer, load_file(folder / "lora.safetensors"), adapter_name=ADAPTER)
    tensors = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value.reshape(()) if slot == "step" else value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(step)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: temp file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
