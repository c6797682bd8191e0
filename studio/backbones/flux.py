"""FLUX.1 (FluxPipeline): FLUX.1-dev, compatible checkpoints and the offline tiny model."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .base import Backbone, Cond

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

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[Cond]:
        conds = []
        for prompt in prompts:
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.encoder_device(),
                max_sequence_length=self.max_sequence_length,
            )
            conds.append(self.to_device({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                                         "text_ids": text_ids}))
        return conds

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                         guidance: float = 1.0) -> torch.Tensor:
        b, c, h, w = x_t.shape
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w).to(dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype)
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

    def pipeline_kwargs(self, cond: Cond, negative: Cond | None, guidance: float) -> dict:
        return {
            "prompt_embeds": cond["prompt_embeds"],
            "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
            "guidance_scale": guidance,
        }


def unpack(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``FluxPipeline._pack_latents`` in latent space: (B, hw/4, 4C) -> (B, C, h, w)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)
