"""Tiny teachers of several pipeline classes, built in-process from fixed seeds with the real diffusers classes."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from dsd_model.tiny import build_tiny_components, build_tiny_text_encoders, tiny_vae_config


def tiny_flux() -> FluxPipeline:
    return FluxPipeline(**build_tiny_components(dsd=False))


def tiny_sd3() -> StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline at tiny size: two CLIP encoders with projections, a T5, a one-layer MMDiT."""
    flux = build_tiny_components(dsd=False)
    clip_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(flux["tokenizer"]), max_position_embeddings=77, projection_dim=32,
    )
    torch.manual_seed(10)
    text_encoder = CLIPTextModelWithProjection(clip_config).eval()
    torch.manual_seed(11)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config).eval()
    _, t5 = build_tiny_text_encoders(len(flux["tokenizer"]), len(flux["tokenizer_2"]))
    torch.manual_seed(12)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    torch.manual_seed(13)
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=flux["tokenizer"], text_encoder_2=text_encoder_2,
        tokenizer_2=flux["tokenizer"], text_encoder_3=t5, tokenizer_3=flux["tokenizer_2"], transformer=transformer,
    )
