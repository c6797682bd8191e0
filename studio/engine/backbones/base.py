"""What every model family provides to the trainer and the generator."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Cond = dict[str, torch.Tensor]  # a prompt's text conditioning, family-specific keys


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


def decoder_device(pipe) -> torch.device:
    """Where the VAE decoder runs (the encoder may be offloaded to the CPU meanwhile)."""
    return next(pipe.vae.decoder.parameters()).device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one (``cuda`` and ``cuda:0`` count as the same)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 on GPUs (the paper's precision), fp32 on the CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision != "auto":
        return table[precision]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    tier: str = "bf16"  # how the base weights are stored (studio.engine.memory chooses it): bf16 | int8 | nf4
    quant_backend: str | None = None  # "bitsandbytes" | "quanto" for the quantised tiers
    text_encoders_on_cpu: bool = False  # loaded with offload_text_encoders: they encode on the CPU

    def __init__(self, backbone_id: str, source: str, pipe, device: torch.device, dtype: torch.dtype):
        self.backbone_id = backbone_id
        self.source = source
        self.pipe = pipe
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, backbone_id: str, source: str, device: torch.device | None = None,
             precision: str = "auto", tier: str = "bf16", offload_text_encoders: bool = False,
             **settings) -> Backbone:
        """Load the pipeline from a local folder or hub id with ``from_pretrained``.

        ``tier`` (see :mod:`studio.engine.memory`) stores the transformer's weights in 8 or 4 bits through
        diffusers' quantisation backends; ``offload_text_encoders`` keeps the text encoders on the
        CPU, where they encode prompts, so they never take GPU memory.
        """
        device = device or default_device()
        dtype = default_dtype(device, precision)
        kwargs, backend = {}, None
        if tier != "bf16":
            from studio.engine.backbones.quantize import pipeline_quantization_config

            kwargs["quantization_config"], backend = pipeline_quantization_config(tier, device, dtype)
        pipe = cls.pipeline_class.from_pretrained(source, torch_dtype=dtype, **kwargs)
        if backend is None and not offload_text_encoders:
            pipe.to(device)
        else:  # module by module: text encoders may stay behind; quantised weights may be in place already
            for name, module in pipe.components.items():
                if not isinstance(module, torch.nn.Module) or (offload_text_encoders and name.startswith("text_")):
                    continue
                if not same_device(next(module.parameters()).device, device):
                    module.to(device)
        pipe.set_progress_bar_config(disable=True)
        backbone = cls(backbone_id, source, pipe, device, dtype)
        backbone.tier, backbone.quant_backend, backbone.text_encoders_on_cpu = tier, backend, offload_text_encoders
        for key, value in settings.items():
            setattr(backbone, key, value)
        return backbone

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
        return {k: v.to(self.device) for k, v in cond.items()}

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> list[Cond]:
        """Text conditioning for each prompt (batch 1 each), on the backbone's device."""

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
                 latents: torch.Tensor | None = None) -> Image.Image:
        """One image from precomputed conditioning, with the pipeline's own sampler.

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
                                          height=height, negative=negative, latents=latents)
        size = self.default_resolution
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        guidance = self.default_guidance if guidance is None else guidance
        result = self.pipe(
            **self.pipeline_kwargs(cond, negative, guidance),
            num_inference_steps=steps or self.default_steps,
            width=width or size, height=height or size,
            generator=generator, latents=latents, output_type="pil",
        )
        return result.images[0]

    @torch.no_grad()
    def generate_stepwise(self, cond: Cond, *, seed: int, steps: int | None = None, guidance: float | None = None,
                          width: int | None = None, height: int | None = None, negative: Cond | None = None,
                          latents: torch.Tensor | None = None) -> Image.Image:
        """:meth:`generate` through :meth:`prepare_sampling`: the pipeline's loop, our device placement."""
        run = self.prepare_sampling(cond, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                    negative=negative, latents=latents)
        x = run.latents
        for t in run.timesteps:
            x = self.pipe.scheduler.step(run.velocity(x, t), t, x, return_dict=False)[0]
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

        ``to`` exists for tests: on a CPU-only machine ``"meta"`` stands in for "somewhere the
        sampler must not touch".
        """
        if same_device(self.device, to):
            return
        for module in self.offload_modules().values():
            module.to(to)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def restore_encoders(self) -> None:
        """Bring everything back onto the backbone's device (for generation with raw prompts).

        Text encoders loaded to stay on the CPU (``offload_text_encoders``) stay there.
        """
        if self.device.type == "cpu":
            return
        if not self.text_encoders_on_cpu and not self.quant_backend:
            self.pipe.to(self.device)
            return
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module) and not (self.text_encoders_on_cpu and name.startswith("text_")):
                if not same_device(next(module.parameters()).device, self.device):
                    module.to(self.device)
