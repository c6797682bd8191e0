"""Put a warm backbone back the way it was loaded, and check that it is.

A job that fails half-way can leave its marks on the warm model: peft's ``add_adapter`` flags the
model as carrying adapters before it injects anything, so a failure inside it leaves a model every
later ``add_adapter`` fails on ("has no attribute 'peft_config'"); an error inside a training step
leaves the LoRA, gradient checkpointing and offloaded text encoders; a template LoRA that loads
half stays half loaded. :func:`restore` undoes all of that without raising, and :func:`problems`
compares the model with the :class:`CleanState` taken right after it was loaded (no LoRA layers,
no peft state, frozen base weights that are the same tensors with the same contents, components
on their devices), so a worker can drop a model it cannot vouch for and load it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Integer views for exact, order-independent checksums, by element size in bytes.
_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class CleanState:
    """What a freshly loaded backbone looks like, in the terms :func:`problems` checks."""

    params: dict[str, tuple]  # transformer parameter name -> (storage identity, shape, dtype, device)
    checksums: dict[str, int]  # name -> exact integer checksum of its contents (where one can be taken)
    devices: dict[str, str]  # pipeline component -> device of its first parameter
    hooks: int  # forward / backward hooks registered on the transformer's modules
    checkpointing: bool


def capture(backbone) -> CleanState:
    """Record the clean state of a backbone that has just been loaded."""
    transformer = backbone.transformer
    params = dict(transformer.named_parameters())
    return CleanState(
        params={name: _identity(p) for name, p in params.items()},
        checksums=_checksums(params),
        devices=_devices(backbone),
        hooks=_hook_count(transformer),
        checkpointing=bool(getattr(transformer, "is_gradient_checkpointing", False)),
    )


def restore(backbone) -> list[str]:
    """Undo whatever a job left on the backbone; never raises. Returns what could not be undone.

    Every LoRA adapter of every component goes (the layers are replaced by their base layers,
    the peft bookkeeping is removed), gradient checkpointing is switched off, the transformer is
    put in eval mode with its weights frozen, and offloaded text encoders come back.
    """
    transformer = backbone.transformer
    steps = (
        ("gradient checkpointing", lambda: _disable_checkpointing(transformer)),
        ("compiled blocks", lambda: uncompile(transformer)),
        ("LoRA adapters", lambda: remove_adapters(backbone)),
        ("eval mode", transformer.eval),
        ("frozen weights", lambda: transformer.requires_grad_(False)),
        # the LoRA's memory (fp32 weights, gradients, optimiser state) is returned before the encoders
        # come back, so the two are never on the device together (the end-of-job spike)
        ("released memory", release_memory),
        ("text encoders", backbone.restore_encoders),
    )
    errors = []
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep going: the other steps may still leave a usable model
            log.warning("could not restore the %s of backbone %s: %s", what, backbone.backbone_id, exc)
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
    return errors


def release_memory() -> None:
    """Collect what a job left unreachable and give the GPU's cached blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def remove_adapters(backbone, keep: Iterable[str] = ()) -> None:
    """Remove the LoRA adapters of every pipeline component, except those named in ``keep``.

    Works from the layers themselves, not only from ``peft_config``, so a half-made adapter goes
    too. Without ``keep`` the LoRA layers are replaced by their base layers and the peft state is
    removed: the components are plain models again.
    """
    keep = set(keep)
    for _, module in components(backbone):
        if keep:
            _delete_adapters(module, keep)
        else:
            _unload(module)


def problems(backbone, state: CleanState) -> list[str]:
    """How the backbone differs from its clean ``state`` (empty when it is clean)."""
    found = []
    for name, module in components(backbone):
        if any(_is_tuner(m) for m in module.modules()):
            found.append(f"{name} still has LoRA layers")
        if getattr(module, "peft_config", None) or getattr(module, "_hf_peft_config_loaded", False):
            found.append(f"{name} still has peft state")
    transformer = backbone.transformer
    if any(m.training for m in transformer.modules()):
        found.append("the transformer is in training mode")
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()):
        found.append("transformer blocks are still compiled")
    if bool(getattr(transformer, "is_gradient_checkpointing", False)) != state.checkpointing:
        found.append("gradient checkpointing is still on")
    params = dict(transformer.named_parameters())
    if any(p.requires_grad for p in params.values()):
        found.append("base weights are trainable")
    if set(params) != set(state.params):
        found.append(f"the transformer's parameters changed ({len(set(params) ^ set(state.params))} names differ)")
    else:
        moved = [n for n, p in params.items() if _identity(p) != state.params[n]]
        if moved:
            found.append(f"{len(moved)} base weights were replaced or changed dtype/device (e.g. {moved[0]})")
        changed = [n for n, value in _checksums(params).items() if state.checksums.get(n, value) != value]
        if changed:
            found.append(f"{len(changed)} base weights changed contents (e.g. {changed[0]})")
    if _hook_count(transformer) != state.hooks:
        found.append("the transformer's hooks changed")
    devices = _devices(backbone)
    misplaced = sorted(n for n in state.devices if devices.get(n) != state.devices[n])
    if misplaced:
        found.append(f"components not on their devices: {', '.join(misplaced)}")
    return found


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks (FLUX: double- and single-stream; SD3: joint blocks)."""
    return [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]


def uncompile(transformer: torch.nn.Module) -> None:
    """Undo ``Module.compile()`` on every submodule (a recipe may compile the blocks for one job).

    ``Module.compile`` keeps the compiled callable in ``_compiled_call_impl``; without it the
    module runs its plain ``forward`` again, so the next job (other adapters) traces nothing stale.
    """
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def components(backbone) -> Iterator[tuple[str, torch.nn.Module]]:
    """The pipeline's torch modules (transformer, text encoders, VAE) by name."""
    for name, module in backbone.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            yield name, module


# -- helpers ------------------------------------------------------------------------------------


def _is_tuner(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _unload(module: torch.nn.Module) -> None:
    """Replace every peft layer by its base layer and drop the peft bookkeeping."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    if any(_is_tuner(m) for m in module.modules()):
        recurse_remove_peft_layers(module)
    module.__dict__.pop("peft_config", None)  # peft sets it as a plain attribute of the model
    if getattr(module, "_hf_peft_config_loaded", False):
        module._hf_peft_config_loaded = False


def _delete_adapters(module: torch.nn.Module, keep: set[str]) -> None:
    """Delete the adapters not in ``keep`` from every layer and from ``peft_config``."""
    tuners = [m for m in module.modules() if _is_tuner(m)]
    names = set(getattr(module, "peft_config", None) or {})
    for layer in tuners:
        names.update(layer._all_available_adapter_names())
    for name in sorted(names - keep):
        for layer in tuners:
            if name in layer._all_available_adapter_names():
                layer.delete_adapter(name)
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)


def _disable_checkpointing(transformer: torch.nn.Module) -> None:
    if getattr(transformer, "is_gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()


def _identity(p: torch.Tensor) -> tuple:
    """Which tensor this is (its storage) and how it is stored."""
    try:
        where = p.data_ptr()
    except Exception:  # tensor subclasses of quantisation backends may have no plain storage
        where = id(p)
    return where, tuple(p.shape), str(p.dtype), str(p.device)


def _checksums(params: dict[str, torch.Tensor]) -> dict[str, int]:
    """Exact integer checksums (sum of the raw values as integers), one device sync per device."""
    sums: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, p in params.items():
            view = _INT_VIEWS.get(p.element_size())
            try:
                value = p.detach().view(view).sum(dtype=torch.int64)
            except Exception:  # a quantised tensor subclass: its identity is checked instead
                continue
            sums.setdefault(str(value.device), {})[name] = value
    out: dict[str, int] = {}
    for by_name in sums.values():
        values = torch.stack(list(by_name.values())).cpu().tolist()
        out.update(zip(by_name, values, strict=True))
    return out


def _devices(backbone) -> dict[str, str]:
    out = {}
    for name, module in components(backbone):
        first = next(module.parameters(), None)
        if first is not None:
            out[name] = str(first.device)
    return out


def _hook_count(module: torch.nn.Module) -> int:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind, None) or {}) for m in module.modules() for kind in kinds)
