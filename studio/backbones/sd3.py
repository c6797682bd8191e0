"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): SD3.5 Large and Medium."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import Backbone, Cond

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

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[Cond]:
        conds = []
        for prompt in prompts:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=self.encoder_device(),
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            conds.append(self.to_device({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}))
        return conds

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                         guidance: float = 1.0) -> torch.Tensor:
        b = x_t.shape[0]
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=(t * 1000.0).to(x_t.device, dtype),  # SD3 takes time steps on the 0..1000 scale
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
