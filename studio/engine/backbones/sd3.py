"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): SD3.5 Large and Medium."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from PIL import Image

from studio.engine.backbones.base import Backbone, Cond, Sampling, decoder_device

# The paper's LoRA targets for SD3/3.5 (appendix, Fig. S3): every attention projection of
# both streams of the joint blocks. The last block is context_pre_only and has no
# to_add_out; the final proj_out and the feed-forwards stay frozen.
SD3_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


class SD3Backbone(Backbone):
    """SD3.x: CLIP-L + CLIP-G + T5 conditioning, unpacked latents, classifier-free guidance."""

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    lora_targets = SD3_LORA_TARGETS
    max_sequence_length = 256
    t5_component = "text_encoder_3"

    def encode_prompt(self, prompt: str, device: torch.device) -> Cond:
        """CLIP-L + CLIP-G + T5 embeddings (Backbone.encode_prompts caches and places them)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                         guidance: float = 1.0) -> torch.Tensor:
        b = x_t.shape[0]
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            # SD3 takes time steps on the 0..1000 scale, in fp32 as its pipeline passes them: in bf16
            # they would round to steps of 4/1000 while x_t was made with the exact t.
            timestep=(t.float() * 1000.0).to(x_t.device),
            encoder_hidden_states=cond["prompt_embeds"].expand(b, -1, -1).to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].expand(b, -1).to(dtype),
            return_dict=False,
        )[0]

    def negative_prompt(self) -> str | None:
        return ""

    def pipeline_kwargs(self, cond: Cond, negative: Cond | None, guidance: float) -> dict:
        kwargs = {
            "prompt_embeds": cond["prompt_embeds"],
            "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
            "guidance_scale": guidance,
        }
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = negative["pooled_prompt_embeds"]
        elif guidance > 1:
            kwargs["guidance_scale"] = 1.0  # no negative conditioning: plain conditional sampling
        return kwargs

    @torch.no_grad()
    def prepare_sampling(self, cond: Cond, *, seed: int, steps: int | None = None,
                         guidance: float | None = None, width: int | None = None, height: int | None = None,
                         negative: Cond | None = None, latents: torch.Tensor | None = None) -> Sampling:
        # Mirrors StableDiffusion3Pipeline.__call__, classifier-free guidance included: the
        # negative and positive halves go through the transformer as one batch, as there.
        pipe = self.pipe
        steps, guidance, width, height = self._sampling_defaults(steps, guidance, width, height)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cfg = negative is not None and guidance > 1  # no negative: plain conditional, like pipeline_kwargs
        if cfg:
            embeds = torch.cat([negative["prompt_embeds"], embeds], dim=0)
            pooled = torch.cat([negative["pooled_prompt_embeds"], pooled], dim=0)
        start = pipe.prepare_latents(1, self.transformer.config.in_channels, height, width,
                                     cond["prompt_embeds"].dtype, self.device, generator, latents)
        config, kwargs = pipe.scheduler.config, {}
        if config.get("use_dynamic_shifting"):
            patch = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (start.shape[2] // patch) * (start.shape[3] // patch), config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, self.device, **kwargs)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([x] * 2) if cfg else x
            out = self.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                   encoder_hidden_states=embeds, pooled_projections=pooled,
                                   joint_attention_kwargs=None, return_dict=False)[0]
            if not cfg:
                return out
            uncond, text = out.chunk(2)
            return uncond + guidance * (text - uncond)

        def decode(x: torch.Tensor) -> Image.Image:
            x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(x.to(decoder_device(pipe)), return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type="pil")[0]

        return Sampling(start, timesteps, velocity, decode)
