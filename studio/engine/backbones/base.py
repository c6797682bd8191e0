"""What every model family provides to the trainer and the generator."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.engine.backbones.quantize import ENCODER_BITS, ENCODER_PLACEMENTS
from studio.errors import CancelledError, InputError

Cond = dict[str, torch.Tensor]  # a prompt's text conditioning, family-specific keys
PROMPT_CACHE_BYTES = 256 * 2**20  # ~60 FLUX prompts (512 x 4096 bf16 each), ~170 SD3 ones


@dataclass
class LatentDist:
    """A reference image's VAE posterior, normalised to the transformer's latent space."""

    mean: torch.Tensor  # (1, C, h, w)
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32)
        return self.mean + self.std * host_to_device(noise, self.mean.device).to(self.mean.dtype)


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without making the host wait for the GPU.

    The trainer draws its random numbers on the CPU (seeded, the same on every device); a plain
    ``.to("cuda")`` from pageable memory synchronises with the GPU, several times per micro-step.
    From pinned memory the copy is queued like a kernel (PyTorch keeps the pinned block alive
    until the copy has run).
    """
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class Sampling:
    """One denoising run set up exactly as the family's diffusers pipeline sets it up.

    :mod:`studio.engine.fusion` drives it step by step: ``velocity(latents, t)`` is the pipeline's
    (guided) prediction at scheduler time step ``t``, ``pipe.scheduler.step`` the Euler update
    (the scheduler is already set to ``timesteps``), ``decode`` the pipeline's output stage.
    """

    latents: torch.Tensor  # the start, in the pipeline's layout (FLUX: packed 2x2 tokens)
    timesteps: torch.Tensor  # the scheduler's time steps, on its 0..1000 scale
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], Image.Image]


class PromptCache:
    """A least-recently-used store of prompt conditionings, bounded by bytes, kept in host memory.

    Host memory, not the GPU: the memory plan gives the GPU's bytes to weights and activations,
    and a hit costs one small copy (a FLUX prompt is 4 MB: well under a millisecond over PCIe).
    """

    def __init__(self, max_bytes: int = PROMPT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, Cond] = OrderedDict()
        self._lock = threading.Lock()  # a worker may serve a generation from another thread

    def get(self, key: tuple) -> Cond | None:
        """The stored conditioning (marked as just used), or None."""
        with self._lock:
            cond = self._entries.get(key)
            if cond is not None:
                self._entries.move_to_end(key)
            return cond

    def put(self, key: tuple, cond: Cond) -> None:
        """Store ``cond`` (CPU tensors), dropping the least recently used entries beyond the bound."""
        size = sum(t.numel() * t.element_size() for t in cond.values())
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self.bytes -= _cond_bytes(old) if old is not None else 0
            self._entries[key] = cond
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= _cond_bytes(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _cond_bytes(cond: Cond) -> int:
    return sum(t.numel() * t.element_size() for t in cond.values())


def resolve_placement(requested: str | None, offload_text_encoders: bool, device: torch.device,
                      dtype: torch.dtype) -> str:
    """The text-encoder placement a load applies (see :mod:`studio.engine.memory_phases`).

    Without one, ``offload_text_encoders`` (the older flag) means ``swap``. On a CPU the encoders
    always compute in fp32 (bf16 matmuls are ~9x slower there): the placement is ``cpu-fp32``, except
    that an fp32 run keeps one asked for by name (tests load quanto-quantised T5 and the swap path).
    """
    name = requested or ("swap" if offload_text_encoders else "gpu")
    if name not in ENCODER_PLACEMENTS:
        raise InputError(f"unknown text-encoder placement {name!r}; choose one of {', '.join(ENCODER_PLACEMENTS)}")
    if device.type == "cpu" and (requested is None or dtype != torch.float32):
        return "cpu-fp32"
    return name


def encoder_devices(placement: str, device: torch.device) -> tuple[torch.device, torch.device]:
    """(where the text encoders rest, where they compute) for a placement on the backbone's ``device``.

    Only ``swap`` rests apart from where it computes: it is moved in for each encode and out again.
    (``gpu`` rests on the GPU but sits on the CPU while a training runs; :meth:`Backbone.offload_encoders`.)
    """
    cpu = torch.device("cpu")
    if device.type == "cpu" or placement == "cpu-fp32":
        return cpu, cpu
    return (cpu if placement == "swap" else device), device


def decoder_device(pipe) -> torch.device:
    """Where the VAE decoder runs (the encoder may be offloaded to the CPU meanwhile)."""
    return next(pipe.vae.decoder.parameters()).device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one (``cuda`` and ``cuda:0`` count as the same)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def stop_between_steps(should_stop: Callable[[], bool]):
    """A pipeline ``callback_on_step_end`` that abandons the picture when ``should_stop()`` says so."""

    def callback(pipe, step: int, timestep, kwargs: dict) -> dict:
        if should_stop():
            raise CancelledError(f"cancelled after denoising step {step + 1}")
        return kwargs

    return callback


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The paper's bf16 on GPUs that compute in it; fp16 on those that do not (T4, V100, RTX 20xx:
    the trainer then scales the loss); fp32 on the CPU. An explicit bf16 on such a GPU is refused."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    on_gpu = device.type == "cuda"
    if precision == "bf16" and on_gpu and not bf16_supported(device):
        from studio.errors import InputError

        raise InputError("this GPU has no bf16 arithmetic (it needs an Ampere card or newer); "
                         "choose precision auto (fp16 with loss scaling) or fp32")
    if precision != "auto":
        return table[precision]
    if not on_gpu:
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def bf16_supported(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0 and up). PyTorch's
    ``is_bf16_supported()`` also says yes for older cards, where bf16 is emulated and slow."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


class Backbone(ABC):
    """A loaded text-to-image pipeline plus the family knowledge the method needs.

    Subclasses implement text encoding, latent encoding and one velocity prediction; the
    trainer and generator only talk to this interface.
    """

    family: str = ""
    pipeline_class: type = object
    lora_targets: tuple[str, ...] = ()
    default_resolution: int = 512
    default_steps: int = 28  # paper: 28 denoising steps at inference
    default_guidance: float = 7.0  # paper: guidance 7.0 at inference
    max_sequence_length: int = 512
    tier: str = "bf16"  # how the base weights are stored (studio.engine.memory chooses it): bf16 | fp8 | int8 | nf4
    quant_backend: str | None = None  # "bitsandbytes" | "quanto" for the quantised tiers
    t5_component: str = ""  # the pipeline component holding T5 (what gpu-8bit / gpu-4bit quantise)
    # Where the text encoders live and compute (studio.engine.memory_phases.PLACEMENTS); Backbone.load sets it.
    text_encoder_placement: str = "gpu"

    def __init__(self, backbone_id: str, source: str, pipe, device: torch.device, dtype: torch.dtype):
        self.backbone_id = backbone_id
        self.source = source
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.prompt_cache = PromptCache()

    @classmethod
    def load(cls, backbone_id: str, source: str, device: torch.device | None = None,
             precision: str = "auto", tier: str = "bf16", offload_text_encoders: bool = False,
             text_encoder_placement: str | None = None, **settings) -> Backbone:
        """Load the pipeline from a local folder or hub id with ``from_pretrained``.

        ``tier`` (see :mod:`studio.engine.memory`) stores the transformer's weights in 8 or 4 bits through
        diffusers' quantisation backends; ``text_encoder_placement`` says where the text encoders live
        and compute (:func:`resolve_placement`; ``offload_text_encoders`` is the older spelling of ``swap``).
        """
        device = device or default_device()
        dtype = default_dtype(device, precision)
        placement = resolve_placement(text_encoder_placement, offload_text_encoders, device, dtype)
        kwargs, backend = {}, None
        t5 = (cls.t5_component, ENCODER_BITS[placement]) if placement in ENCODER_BITS else None
        if tier != "bf16" or t5 is not None:
            from studio.engine.backbones.quantize import pipeline_quantization_config

            config, backend = pipeline_quantization_config(tier, device, dtype, text_encoder=t5)
            kwargs["quantization_config"] = config
        pipe = cls.pipeline_class.from_pretrained(source, torch_dtype=dtype, **kwargs)
        _place_components(pipe, device, placement)
        pipe.set_progress_bar_config(disable=True)
        backbone = cls(backbone_id, source, pipe, device, dtype)
        backbone.tier, backbone.quant_backend, backbone.text_encoder_placement = tier, backend, placement
        for key, value in settings.items():
            setattr(backbone, key, value)
        return backbone

    @property
    def text_encoders_on_cpu(self) -> bool:
        """Whether the text encoders rest in host memory apart from the GPU (``swap``, ``cpu-fp32``)."""
        return self.device.type != "cpu" and self.encoder_homes()[0].type == "cpu"

    def encoder_homes(self) -> tuple[torch.device, torch.device]:
        """(where the text encoders rest, where they compute): :func:`encoder_devices` of the placement."""
        return encoder_devices(self.text_encoder_placement, self.device)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downscale x patch size)."""
        return max(16, self.vae_scale_factor * 2)

    # -- encoding, done once per job ------------------------------------------------------

    def encoder_device(self) -> torch.device:
        """Where the text encoders are now: the GPU, or the CPU while a training offloads them."""
        return next(self.pipe.text_encoder.parameters()).device

    def to_device(self, cond: Cond) -> Cond:
        """A conditioning on the backbone's device, floating tensors in its dtype (fp32 encoders give fp32)."""
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype, copy=True)
                for k, v in cond.items()}

    def prompt_key(self, prompt: str) -> tuple:
        """What a cached conditioning depends on besides the weights of this backbone's encoders."""
        return (self.source, self.max_sequence_length, prompt)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[Cond]:
        """Text conditioning for each prompt (batch 1 each), on the backbone's device.

        Conditionings come from :attr:`prompt_cache` when they can; only the misses reach the text
        encoders, which are moved to where they compute for them and back to where they rest
        (:meth:`encoders_for_encoding`), so callers never move encoders to encode.
        """
        found = {p: self.prompt_cache.get(self.prompt_key(p)) for p in dict.fromkeys(prompts)}
        misses = [p for p, cond in found.items() if cond is None]
        if misses:
            with self.encoders_for_encoding() as device:
                for prompt in misses:
                    cond = {k: v.to("cpu", self.dtype if v.is_floating_point() else v.dtype)
                            for k, v in self.encode_prompt(prompt, device).items()}
                    self.prompt_cache.put(self.prompt_key(prompt), cond)
                    found[prompt] = cond
        return [self.to_device(found[p]) for p in prompts]

    @abstractmethod
    def encode_prompt(self, prompt: str, device: torch.device) -> Cond:
        """One prompt's conditioning from the text encoders, which are on ``device`` (the family's code)."""

    @contextmanager
    def encoders_for_encoding(self) -> Iterator[torch.device]:
        """The text encoders on the device where they compute, for the block; then back where they were.

        ``swap`` rests on the CPU and computes on the GPU; ``gpu`` does too while a training has them
        offloaded. Quantised encoders never move (they stay put by design). Yields the compute device.
        """
        target = self.encoder_homes()[1]
        modules = {} if self.text_encoder_placement in ENCODER_BITS else self.offload_modules()
        moved = {n: d for n, m in modules.items() if not same_device(d := _module_device(m), target)}
        for name in moved:
            modules[name].to(target)
        try:
            yield target if modules else self.encoder_device()
        finally:
            for name, home in moved.items():
                modules[name].to(home)
            if moved and torch.cuda.is_available():
                torch.cuda.empty_cache()  # the encoders' blocks go back to training and sampling

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> list[LatentDist]:
        """VAE-encode RGB images to normalised latent distributions ``(z - shift) * scale``."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = vae.config.scaling_factor
        out = []
        for img in images:
            pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
            pixels = pixels.permute(2, 0, 1)[None].to(self.device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            out.append(LatentDist(mean=((dist.mean - shift) * scale).float(), std=(dist.std * scale).float()))
        return out

    # -- the training step ----------------------------------------------------------------

    @abstractmethod
    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                         guidance: float = 1.0) -> torch.Tensor:
        """The transformer's velocity prediction for unpacked latents ``x_t`` (B, C, h, w)."""

    # -- sampling ---------------------------------------------------------------------------

    @abstractmethod
    def pipeline_kwargs(self, cond: Cond, negative: Cond | None, guidance: float) -> dict:
        """Keyword arguments that make the diffusers pipeline use precomputed embeddings."""

    def negative_prompt(self) -> str | None:
        """The prompt encoded for classifier-free guidance, or None if the family needs none."""
        return None

    @torch.no_grad()
    def generate(self, cond: Cond, *, seed: int, steps: int | None = None, guidance: float | None = None,
                 width: int | None = None, height: int | None = None, negative: Cond | None = None,
                 latents: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None) -> Image.Image:
        """One image from precomputed conditioning, with the pipeline's own sampler.

        ``should_stop`` is asked after every denoising step; when it says yes the image is abandoned
        with :class:`studio.errors.CancelledError` (a cancel waits for one step, not for the picture).

        While a training has the text encoders off the GPU, diffusers releases before
        huggingface/diffusers#14383 (our requirements allow them) take the pipeline's device from
        its alphabetically first component, the text encoder: the CPU. The pipeline would then
        put the latents on the CPU and feed them to the transformer on the GPU. In that case the
        same sampler runs step by step (:meth:`prepare_sampling` places everything on
        ``self.device`` explicitly and reproduces the pipeline's image, see tests/test_fusion.py).
        """
        pipeline_device = getattr(self.pipe, "_execution_device", None) or self.pipe.device
        if not same_device(pipeline_device, self.device):
            return self.generate_stepwise(cond, seed=seed, steps=steps, guidance=guidance, width=width,
                                          height=height, negative=negative, latents=latents,
                                          should_stop=should_stop)
        size = self.default_resolution
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        guidance = self.default_guidance if guidance is None else guidance
        result = self.pipe(
            **self.pipeline_kwargs(cond, negative, guidance),
            num_inference_steps=steps or self.default_steps,
            width=width or size, height=height or size,
            generator=generator, latents=latents, output_type="pil",
            callback_on_step_end=stop_between_steps(should_stop) if should_stop else None,
            callback_on_step_end_tensor_inputs=[],
        )
        return result.images[0]

    @torch.no_grad()
    def generate_stepwise(self, cond: Cond, *, seed: int, steps: int | None = None, guidance: float | None = None,
                          width: int | None = None, height: int | None = None, negative: Cond | None = None,
                          latents: torch.Tensor | None = None,
                          should_stop: Callable[[], bool] | None = None) -> Image.Image:
        """:meth:`generate` through :meth:`prepare_sampling`: the pipeline's loop, our device placement."""
        run = self.prepare_sampling(cond, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                    negative=negative, latents=latents)
        x = run.latents
        for i, t in enumerate(run.timesteps):
            x = self.pipe.scheduler.step(run.velocity(x, t), t, x, return_dict=False)[0]
            if should_stop is not None and should_stop():
                raise CancelledError(f"cancelled after denoising step {i + 1} of {len(run.timesteps)}")
        return run.decode(x)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the unpacked latent the pipeline starts from at this image size."""
        f = self.vae_scale_factor
        return self.pipe.vae.config.latent_channels, height // f, width // f

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents (B, C, h, w) in the layout the pipeline's ``latents=`` argument takes."""
        return latents

    def prepare_sampling(self, cond: Cond, *, seed: int, steps: int | None = None,
                         guidance: float | None = None, width: int | None = None, height: int | None = None,
                         negative: Cond | None = None, latents: torch.Tensor | None = None) -> Sampling:
        """Set up a step-by-step run equal to :meth:`generate` with the same arguments."""
        raise NotImplementedError(f"{type(self).__name__} has no step-by-step sampler")

    def _sampling_defaults(self, steps: int | None, guidance: float | None, width: int | None,
                           height: int | None) -> tuple[int, float, int, int]:
        size = self.default_resolution
        return (steps or self.default_steps, self.default_guidance if guidance is None else guidance,
                width or size, height or size)

    # -- LoRAs ------------------------------------------------------------------------------

    def load_lora(self, folder: str | Path, adapter_name: str, weight_name: str = "lora.safetensors") -> None:
        """Load a template's LoRA (diffusers/PEFT keys) as a named adapter of the warm transformer.

        Through the pipeline's ``load_lora_weights``, except on a quanto-quantised transformer: there
        diffusers' pipeline loader looks up the base weights by their plain names (to widen FLUX
        Control LoRAs, which templates never are) and quanto stores them as ``weight._data``, so the
        LoRA goes to the transformer's own loader, which does the same injection without that step.
        """
        if self.quant_backend == "quanto":
            self.transformer.load_lora_adapter(str(folder), weight_name=weight_name, prefix="transformer",
                                               adapter_name=adapter_name)
        else:
            self.pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)

    # -- memory -----------------------------------------------------------------------------

    def offload_modules(self) -> dict[str, torch.nn.Module]:
        """What a training moves off the GPU once prompts and references are encoded: the text encoders.

        The VAE stays whole on the device: its encoder is about 34M parameters (under 0.1 % of
        FLUX's memory), previews and generations between training steps need its decoder, and
        diffusers takes ``vae.device`` from the VAE's first parameter, which is the encoder's,
        so an offloaded encoder would send the decoder's input to the CPU in pipelines that
        move latents to ``vae.device`` before decoding.
        """
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: m for n in names if isinstance(m := getattr(self.pipe, n, None), torch.nn.Module)}

    def offload_encoders(self, to: torch.device | str = "cpu") -> None:
        """Move :meth:`offload_modules` off the backbone's device (to the CPU) while training runs.

        Quantised encoders (``gpu-8bit`` / ``gpu-4bit``) stay: the memory plan counts them in every
        phase. Encoders resting on the CPU are there already. A later :meth:`encode_prompts` moves
        them in for its encode and out again. ``to`` exists for tests: on a CPU-only machine
        ``"meta"`` stands in for "somewhere the sampler must not touch".
        """
        if same_device(self.device, to) or self.text_encoder_placement in ENCODER_BITS:
            return
        moved = False
        for module in self.offload_modules().values():
            if not same_device(_module_device(module), to):
                module.to(to)
                moved = True
        if moved and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def restore_encoders(self) -> None:
        """Bring every component back where it rests (for generation with raw prompts).

        The transformer and VAE rest on the backbone's device, the text encoders where their
        placement puts them (the CPU for ``swap`` and ``cpu-fp32``).
        """
        if self.device.type == "cpu":
            return
        home = self.encoder_homes()[0]
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module):
                where = home if name in self.offload_modules() else self.device
                if not same_device(_module_device(module), where):
                    module.to(where)


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _place_components(pipe, device: torch.device, placement: str) -> None:
    """Put a freshly loaded pipeline's modules where ``placement`` wants them.

    Text encoders resting on the CPU stay there (``cpu-fp32`` ones in fp32); everything else goes
    to ``device``, except modules a quantiser already put there (bitsandbytes ones cannot move).
    """
    home = encoder_devices(placement, device)[0]
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        encoder = name.startswith("text_encoder")
        if encoder and placement == "cpu-fp32":
            module.to(torch.float32)
        where = home if encoder else device
        if not same_device(_module_device(module), where):
            module.to(where)
