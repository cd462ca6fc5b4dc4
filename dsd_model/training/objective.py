"""The rectified-flow (flow-matching) objective of DSD training, over the whole [reference | target] canvas.

    x0 = packed VAE sample of [reference | target], (z - shift) * scale      what the model learns to generate
    c  = packed VAE sample of [reference | black],  (z - shift) * scale      its condition, as inference encodes it
    sigma ~ FLUX-shifted logit-normal;  x_t = (1 - sigma) x0 + sigma noise;  target velocity = noise - x0
    loss  = mean squared error of F([x_t, c], sigma, prompt) against the target velocity

One uniform draw per sample picks its inputs among the three passes of true CFG at inference:

    (prompt, condition)          v   = F(x, prompt, c)      1 - text_dropout - text_and_condition_dropout
    (empty prompt, condition)    u_t = F(x, "", c)          text_dropout
    (empty prompt, zero cond.)   u   = F(x, "", c=0)        text_and_condition_dropout

(prompt, zero condition) is never drawn: no inference pass uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..pipeline import DSDPipeline, latent_image_ids, sample_latents
from .config import TrainConfig
from .dataset import TrainingBatch
from .embedding_cache import CachedBatch


@dataclass
class FlowMatchingInputs:
    """One batch's transformer inputs, its target velocity, and which samples had their condition or text dropped."""

    hidden_states: torch.Tensor
    sigmas: torch.Tensor
    guidance: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    target: torch.Tensor
    condition_dropped: torch.Tensor
    text_dropped: torch.Tensor


def shift_sigmas(t: torch.Tensor, image_seq_len: int, scheduler_config) -> torch.Tensor:
    """FLUX's resolution-dependent shift `e^mu / (e^mu + 1/t - 1)`, with `mu` from the token count as at inference."""
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def draw_dropout(size: int, config: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of `size` samples train with a zeroed condition, and which with the empty prompt, from one joint draw
    per sample: a zeroed condition always comes with the empty prompt."""
    draw = torch.rand(size, generator=generator)
    condition_dropped = draw < config.text_and_condition_dropout
    text_dropped = draw < config.text_and_condition_dropout + config.text_dropout
    return condition_dropped, text_dropped


@torch.no_grad()
def flow_matching_inputs(
    pipe: DSDPipeline, batch: TrainingBatch | CachedBatch, config: TrainConfig, generator: torch.Generator
) -> FlowMatchingInputs:
    """Encode a batch (or take its cached encodings) and draw its randomness from `generator` in a fixed order:
    condition dropout, text dropout, timesteps, the VAE posterior samples, the noise. The same generator state
    gives the same inputs, cached or not."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    size = batch.targets.shape[0]
    condition_dropped, text_dropped = draw_dropout(size, config, generator)
    t = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(size, generator=generator))

    parameters, shift_factor, scaling_factor, prompt_embeds, pooled = _encode(pipe, batch, text_dropped)
    x0, condition = sample_latents(parameters, generator, shift_factor, scaling_factor).float().chunk(2)
    condition[condition_dropped.to(device)] = 0
    noise = torch.randn(x0.shape, generator=generator).to(device)

    sigmas = shift_sigmas(t, x0.shape[1], pipe.scheduler.config).to(device)
    s = sigmas[:, None, None]
    noisy = (1 - s) * x0 + s * noise
    height, width = parameters.shape[2:]
    return FlowMatchingInputs(
        hidden_states=torch.cat([noisy, condition], dim=2).to(dtype),
        sigmas=sigmas.to(dtype),
        guidance=torch.full((size,), config.guidance, device=device) if pipe.transformer.config.guidance_embeds
        else None,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=latent_image_ids(height, width, device, dtype),
        target=noise - x0,
        condition_dropped=condition_dropped,
        text_dropped=text_dropped,
    )


def _encode(pipe: DSDPipeline, batch: TrainingBatch | CachedBatch, text_dropped: torch.Tensor) -> tuple:
    """VAE posterior parameters of [targets, conditions] with the VAE's shift and scale, and the prompt embeddings
    (the empty prompt's where the text is dropped): from the encoders, or from the embedding cache."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    if isinstance(batch, CachedBatch):
        parameters = torch.cat([batch.targets, batch.conditions]).to(device)
        prompt_embeds = torch.where(text_dropped[:, None, None], batch.empty_embeds, batch.prompt_embeds)
        pooled = torch.where(text_dropped[:, None], batch.empty_pooled, batch.pooled)
        return (parameters, batch.shift_factor, batch.scaling_factor, prompt_embeds.to(device, dtype),
                pooled.to(device, dtype))
    canvases = torch.cat([batch.targets, batch.conditions]).to(device=device, dtype=pipe.vae.dtype)
    parameters = pipe.vae.encode(canvases).latent_dist.parameters
    captions = [
        "" if dropped else caption for caption, dropped in zip(batch.captions, text_dropped.tolist(), strict=True)
    ]
    return (parameters, pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor, *pipe.encode_prompt(captions))


def predict_velocity(transformer: torch.nn.Module, inputs: FlowMatchingInputs) -> torch.Tensor:
    """The transformer's velocity prediction for every canvas token, [B, tokens, channels]."""
    return transformer(
        hidden_states=inputs.hidden_states,
        timestep=inputs.sigmas,
        guidance=inputs.guidance,
        pooled_projections=inputs.pooled_prompt_embeds,
        encoder_hidden_states=inputs.prompt_embeds,
        txt_ids=inputs.txt_ids,
        img_ids=inputs.img_ids,
        return_dict=False,
    )[0]


def flow_matching_loss(transformer: torch.nn.Module, inputs: FlowMatchingInputs) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity, in float32, over the whole canvas."""
    return F.mse_loss(predict_velocity(transformer, inputs).float(), inputs.target.float())
