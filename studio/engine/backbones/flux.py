"""FLUX.1 (FluxPipeline): FLUX.1-dev, compatible checkpoints and the offline tiny model."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from studio.engine.backbones.base import Backbone, Cond, Sampling, decoder_device

# The paper's LoRA targets for FLUX (appendix, Fig. S3). In the 19 double-stream blocks they
# hit the attention of both streams (image: to_q/k/v, to_out.0; text: add_q/k/v_proj); in the
# 38 single-stream blocks to_q/k/v, proj_mlp and proj_out. As a bare name "proj_out" also
# matches the transformer's final projection, kept for fidelity. Feed-forwards stay frozen,
# and so does the text stream's output projection (to_add_out is not in the list).
FLUX_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj",
    "proj_mlp", "proj_out",
)


class FluxBackbone(Backbone):
    """FLUX: T5 + CLIP-pooled text conditioning, 2x2-packed latents, guidance embedding."""

    family = "flux"
    pipeline_class = FluxPipeline
    lora_targets = FLUX_LORA_TARGETS
    max_sequence_length = 512
    t5_component = "text_encoder_2"

    def encode_prompt(self, prompt: str, device: torch.device) -> Cond:
        """CLIP-L's pooled embedding and T5's token embeddings (Backbone.encode_prompts caches and places them)."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                         guidance: float = 1.0) -> torch.Tensor:
        b, c, h, w = x_t.shape
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w).to(dtype)
        img_ids = self._image_ids(h // 2, w // 2, x_t.device, dtype)
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            # FLUX-dev is guidance-distilled; the paper feeds 1.0 while fine-tuning.
            guidance_vec = torch.full((b,), float(guidance), device=x_t.device, dtype=dtype)
        out = self.transformer(
            hidden_states=packed,
            timestep=t.to(x_t.device, dtype),  # the transformer multiplies by 1000 itself
            guidance=guidance_vec,
            pooled_projections=cond["pooled_prompt_embeds"].expand(b, -1).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].expand(b, -1, -1).to(dtype),
            txt_ids=cond["text_ids"].to(dtype),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack(out, c, h, w)

    def _image_ids(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The packed latents' position ids, made once per size: diffusers builds them on the CPU
        and copies them over, which would make every training micro-step wait for the GPU."""
        cache = self.__dict__.setdefault("_image_ids_cache", {})
        key = (h, w, str(device), dtype)
        if key not in cache:
            cache[key] = FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype)
        return cache[key]

    def pipeline_kwargs(self, cond: Cond, negative: Cond | None, guidance: float) -> dict:
        return {
            "prompt_embeds": cond["prompt_embeds"],
            "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
            "guidance_scale": guidance,
        }

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @torch.no_grad()
    def prepare_sampling(self, cond: Cond, *, seed: int, steps: int | None = None,
                         guidance: float | None = None, width: int | None = None, height: int | None = None,
                         negative: Cond | None = None, latents: torch.Tensor | None = None) -> Sampling:
        # Mirrors FluxPipeline.__call__ (diffusers 0.3x-0.4x) line by line, so a run whose every
        # step uses this velocity reproduces the pipeline's image exactly. No true CFG: the
        # pipeline only does it with true_cfg_scale > 1, which generate() never passes.
        pipe = self.pipe
        steps, guidance, width, height = self._sampling_defaults(steps, guidance, width, height)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        channels = self.transformer.config.in_channels // 4
        start, image_ids = pipe.prepare_latents(1, channels, height, width, embeds.dtype, self.device,
                                                generator, latents)
        config = pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(start.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        pipe.scheduler.set_begin_index(0)
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            guidance_vec = torch.full([1], guidance, device=self.device, dtype=torch.float32).expand(1)
        text_ids = cond["text_ids"]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.expand(x.shape[0]).to(x.dtype)
            return self.transformer(
                hidden_states=x, timestep=timestep / 1000, guidance=guidance_vec, pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, joint_attention_kwargs={},
                return_dict=False,
            )[0]

        def decode(x: torch.Tensor) -> Image.Image:
            x = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
            x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            # the decoder's device: while a training runs, the VAE *encoder* sits on the CPU
            image = pipe.vae.decode(x.to(decoder_device(pipe)), return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type="pil")[0]

        return Sampling(start, timesteps, velocity, decode)


def unpack(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``FluxPipeline._pack_latents`` in latent space: (B, hw/4, 4C) -> (B, C, h, w)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)
