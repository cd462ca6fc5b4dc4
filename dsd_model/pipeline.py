"""The DSD pipeline: FLUX.1-dev with the reference latents concatenated on the channel axis.

`DSDPipeline.__call__` reads as numbered steps and is built from three stage functions that the serving engine
calls directly, so there is one implementation of the math:

    prepare(requests) -> states    encode prompts, encode the [reference | black] canvas, draw noise, schedule
    step(states)                   one batched transformer forward over any mix of states (an exact request's
                                   rows in one of their own), then an Euler update
    finish(state) -> image         unpack, decode, keep the right half

Official facts reproduced (DESIGN.md section 1): the canvas, condition encoding `(z - shift) * scale` then 2x2
packing, noise over the whole canvas, image ids over the whole canvas grid, flow-match Euler with
`sigmas = linspace(1, 1/N, N)` and dynamic shift from the token count, distilled guidance, and dual true CFG
`u + s_i (u_t - u) + s_t (v - u_t)` applied when `s_i > 1` from step 2 on, its three passes run as rows of one
forward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from . import limits
from .adapters import AdapterRegistry, LoadedAdapter
from .errors import InputError
from .images import condition_canvas, decode_image, to_pil

logger = logging.getLogger(__name__)

VAE_SCALE_FACTOR = 8
"""Pixels per latent side in the FLUX VAE; with 2x2 packing one image token covers 16x16 pixels."""


@dataclass
class GenerationRequest:
    """One image to generate. Values are validated by `validate_request`; nothing is corrected silently."""

    image: Image.Image
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    image_guidance_scale: float = 1.0
    text_guidance_scale: float = 1.0
    size: int = 512
    seed: int | None = None
    latents: torch.Tensor | None = None
    full_canvas: bool = False
    adapter: str | None = None
    image_digest: str | None = None
    """sha256 (hex) of the preprocessed reference (`image` itself, as `dsd_serve.runtime.canvas_digest` computes
    it), set by transports; with it the engine looks the condition latents up in the latent cache."""
    exact: bool = False
    """Run this request's rows in a transformer forward of their own at every step, so its image is byte-identical
    to the request run alone whatever else shares the step (see `DSDPipeline.step`). Costs throughput: its forward
    is not batched with other requests'."""
    preview_steps: tuple[int, ...] = ()
    """Counts of completed steps (1 to `num_inference_steps`, increasing) after which `step` keeps the model's
    clean-image estimate for `DSDPipeline.preview`. Previews never change the final image."""

    @property
    def uses_cfg(self) -> bool:
        return self.image_guidance_scale > 1.0

    def rows_at(self, step_index: int) -> int:
        """Transformer rows this request needs at `step_index`: three while true CFG is on, else one."""
        return 3 if self.uses_cfg and step_index >= limits.CFG_START_STEP else 1

    @property
    def max_rows(self) -> int:
        return 3 if self.uses_cfg and self.num_inference_steps > limits.CFG_START_STEP else 1


def _check_number(name: str, value, low, high, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InputError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(name, f"must be finite, got {value!r}")
    if not low <= value <= high:
        raise InputError(name, f"{value!r} is outside [{low}, {high}]")


def validate_request(request: GenerationRequest) -> None:
    """Raise `InputError` naming the field and its limit for any value outside the documented bounds."""
    if not isinstance(request.image, Image.Image) or request.image.mode != "RGB":
        raise InputError("image", "must be an RGB PIL image; decode it with `dsd_model.images.decode_image`")
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if not isinstance(text, str):
            raise InputError(name, f"must be a string, got {type(text).__name__}")
        if len(text) > limits.MAX_PROMPT_CHARS:
            raise InputError(name, f"has {len(text)} characters; the limit is {limits.MAX_PROMPT_CHARS}")
    if not request.prompt.strip():
        raise InputError("prompt", "must not be empty")
    _check_number("num_inference_steps", request.num_inference_steps, limits.MIN_STEPS, limits.MAX_STEPS, True)
    _check_number("guidance_scale", request.guidance_scale, limits.MIN_GUIDANCE, limits.MAX_GUIDANCE)
    _check_number("image_guidance_scale", request.image_guidance_scale, limits.MIN_CFG, limits.MAX_CFG)
    _check_number("text_guidance_scale", request.text_guidance_scale, limits.MIN_CFG, limits.MAX_CFG)
    _check_number("size", request.size, limits.MIN_SIZE, limits.MAX_SIZE, True)
    if request.size % limits.SIZE_MULTIPLE:
        raise InputError("size", f"{request.size} is not a multiple of {limits.SIZE_MULTIPLE}")
    if request.seed is not None:
        _check_number("seed", request.seed, 0, limits.MAX_SEED, True)
    if not isinstance(request.exact, bool):
        raise InputError("exact", f"must be a boolean, got {request.exact!r}")
    steps = request.preview_steps
    if not isinstance(steps, tuple) or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
        raise InputError("preview_steps", f"must be a tuple of integers, got {steps!r}")
    if any(not 1 <= s <= request.num_inference_steps for s in steps) or list(steps) != sorted(set(steps)):
        raise InputError("preview_steps", f"{steps!r} must be increasing step counts from 1 to "
                         f"num_inference_steps={request.num_inference_steps}")


@dataclass
class DenoiseState:
    """Everything one request carries through the denoising loop; `step` advances `step_index`."""

    request: GenerationRequest
    seed: int
    latents: torch.Tensor
    condition: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    adapter: LoadedAdapter | None = None
    """The adapter this request's rows use (the one `request.adapter` names, or one an adapter store loaded)."""
    step_index: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def rows(self) -> int:
        return self.request.rows_at(self.step_index)



@dataclass
class DSDPipelineOutput(BaseOutput):
    images: list[Image.Image] | torch.Tensor
    seeds: list[int]


class CanvasPacking:
    """Rows of different canvas sizes in one forward. Each row's image tokens are laid out in the largest canvas's
    token grid at the positions of their own (row, column) image ids, so the largest grid's rotary positions are
    each token's own; the rest of the grid is padding, which the attention mask hides from every query (text tokens
    come first in FLUX's joint attention and are all kept). Every other operation of the transformer is per token, so
    a row's real tokens compute what they compute alone, up to float rounding of other kernel shapes; the padding's
    outputs are dropped by `unpack`."""

    def __init__(self, row_sizes: Sequence[int], text_tokens: int):
        largest = max(row_sizes)
        self.columns = 2 * largest // 16
        self.tokens = (largest // 16) * self.columns
        self.positions = {size: self._positions(size) for size in set(row_sizes)}
        self.row_sizes = list(row_sizes)
        keep = torch.zeros(len(row_sizes), text_tokens + self.tokens, dtype=torch.bool)
        keep[:, :text_tokens] = True
        for row, size in enumerate(row_sizes):
            keep[row, text_tokens + self.positions[size]] = True
        self.attention_mask = keep[:, None, None, :]
        """[rows, 1, 1, text + image tokens], True where a token may be attended to."""

    def _positions(self, size: int) -> torch.Tensor:
        rows, columns = size // 16, 2 * size // 16
        return (torch.arange(rows)[:, None] * self.columns + torch.arange(columns)[None, :]).reshape(-1)

    def pack(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """[rows, largest tokens, channels] from each row's [1, its tokens, channels]."""
        first = hidden[0]
        packed = first.new_zeros(len(hidden), self.tokens, first.shape[-1])
        for row, tokens in enumerate(hidden):
            packed[row, self.positions[self.row_sizes[row]].to(tokens.device)] = tokens[0]
        self.attention_mask = self.attention_mask.to(first.device)
        return packed

    def unpack(self, rows: torch.Tensor, size: int) -> torch.Tensor:
        """The tokens of canvas `size` from rows laid out in the largest grid."""
        return rows[:, self.positions[size].to(rows.device)]


def adapter_order(state: DenoiseState) -> tuple[str, str]:
    adapter = state.adapter
    return (adapter.name, adapter.digest) if adapter is not None else ("", "")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2 * W/2, 4C] (2x2 patches, FLUX's packing)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def sample_latents(
    parameters: torch.Tensor, generator: torch.Generator, shift_factor: float, scaling_factor: float
) -> torch.Tensor:
    """Sample VAE posteriors (mean and log-variance stacked on the channel axis) with `generator`, shift and scale
    as the VAE config says, and pack into transformer tokens."""
    distribution = DiagonalGaussianDistribution(parameters)
    # float32, then rounded: the same draw in every dtype (see `DSDPipeline.prepare`)
    sample = randn_tensor(
        distribution.mean.shape, generator=generator, device=parameters.device, dtype=torch.float32
    ).to(parameters.dtype)
    latents = distribution.mean + distribution.std * sample
    return pack_latents((latents - shift_factor) * scaling_factor)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent grid of `height` x `width`."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, col) for each packed token of a `height` x `width` latent grid."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class DSDPipeline(DiffusionPipeline):
    r"""Zero-shot identity- and structure-preserving generation from one reference image and a prompt.

    Components are those of FLUX.1-dev; the transformer is a stock `FluxTransformer2DModel` with
    `in_channels = 2 * packed_channels` (noise and condition concatenated on the channel axis).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer | PreTrainedTokenizerBase,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: PreTrainedTokenizerBase,
        transformer: FluxTransformer2DModel,
    ):
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        packed = transformer.config.in_channels // 2
        expected_out = transformer.config.out_channels or transformer.config.in_channels
        if expected_out != packed or packed != 4 * vae.config.latent_channels:
            raise ValueError(
                f"transformer in/out channels {transformer.config.in_channels}/{expected_out} do not fit a DSD "
                f"transformer for a VAE with {vae.config.latent_channels} latent channels: expected in_channels="
                f"{8 * vae.config.latent_channels}, out_channels={4 * vae.config.latent_channels}. "
                "Convert a plain FLUX or official DSD checkpoint with `dsd convert`."
            )
        self.adapters = AdapterRegistry(transformer)
        self.max_sequence_length = 512
        """T5 prompt tokens (FLUX.1-dev's 512); `load_pipeline` sets it from the settings."""
        self.tokenizer_max_length = text_encoder.config.max_position_embeddings
        self._prompt_cache = None
        self._tokenizer_lock = threading.Lock()
        """Fast tokenizers keep their padding/truncation state between calls; transports count tokens while the
        engine encodes."""
        self.denoiser = None
        """Replaces the stock transformer call in `_forward`; `acceleration.accelerate` installs one."""

    # ------------------------------------------------------------------ prompt encoding

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 hidden states padded to `max_sequence_length` and pooled CLIP embeddings for a list of prompts.

        Each prompt is encoded as a batch of one, so a prompt's embedding never depends on the prompts encoded with
        it (batched kernels round differently per batch shape); the embeddings are what every later step reads."""
        encoded = [self._encode_one_prompt(prompt) for prompt in prompts]
        return torch.cat([embeds for embeds, _ in encoded]), torch.cat([pooled for _, pooled in encoded])

    def _encode_one_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._execution_device
        with self._tokenizer_lock:
            t5_ids = self.tokenizer_2(
                [prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            clip_ids = self.tokenizer(
                [prompt], padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
        prompt_embeds = self.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        dtype = self.transformer.dtype
        return prompt_embeds.to(dtype=dtype), pooled.to(dtype=dtype)

    def check_prompt(self, prompt: str, field: str = "prompt") -> list[str]:
        """Refuse a prompt longer than `MAX_PROMPT_CHARS` or the T5 window (`max_sequence_length` tokens) with an
        `InputError` naming `field`; return a notice when it is longer than CLIP's window, whose pooled embedding reads
        only the start."""
        if len(prompt) > limits.MAX_PROMPT_CHARS:
            raise InputError(field, f"has {len(prompt)} characters; the limit is {limits.MAX_PROMPT_CHARS}")
        with self._tokenizer_lock:
            t5_tokens = len(self.tokenizer_2(prompt, verbose=False).input_ids)
            clip_tokens = len(self.tokenizer(prompt, verbose=False).input_ids)
        if t5_tokens > self.max_sequence_length:
            raise InputError(field, f"is {t5_tokens} T5 tokens long; the limit is {self.max_sequence_length} tokens")
        if clip_tokens > self.tokenizer_max_length:
            return [f"{field}: {clip_tokens} CLIP tokens, only the first {self.tokenizer_max_length} reach the pooled "
                    "CLIP embedding"]
        return []

    def _encode_prompts_cached(self, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Embeddings per distinct prompt, through the optional in-process cache (`set_prompt_cache`)."""
        unique = list(dict.fromkeys(prompts))
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self._prompt_cache is not None:
            for prompt in unique:
                hit = self._prompt_cache.get((prompt, self.max_sequence_length))
                if hit is not None:
                    found[prompt] = hit
        for prompt in unique:
            if prompt not in found:
                found[prompt] = self._encode_one_prompt(prompt)
                if self._prompt_cache is not None:
                    self._prompt_cache.put((prompt, self.max_sequence_length), found[prompt])
        return found

    def set_prompt_cache(self, cache) -> None:
        """Reuse prompt embeddings through `cache` (get(key) / put(key, value) with key = (prompt,
        max_sequence_length), e.g. `dsd_model.serving.prompt_cache.PromptCache`); None disables."""
        self._prompt_cache = cache

    # ------------------------------------------------------------------ condition encoding

    @torch.no_grad()
    def encode_condition_distribution(self, image: Image.Image, size: int) -> torch.Tensor:
        """VAE posterior parameters (mean and log-variance, concatenated on channels) of the [reference | black]
        canvas. This is what the latent cache stores: a sample drawn from it with the request's generator equals
        the sample drawn without the cache."""
        canvas = condition_canvas(image, size).to(device=self._execution_device, dtype=self.vae.dtype)
        return self.vae.encode(canvas).latent_dist.parameters

    def condition_latents(self, parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample the posterior with `generator`, shift and scale, pack: the transformer's condition channels."""
        return sample_latents(parameters, generator, self.vae.config.shift_factor, self.vae.config.scaling_factor)

    # ------------------------------------------------------------------ stage functions

    def schedule(self, num_inference_steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and sigmas (with the final 0) of the official schedule for one request."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self._execution_device)
        return scheduler.timesteps, scheduler.sigmas

    @torch.no_grad()
    def prepare(
        self,
        requests: Sequence[GenerationRequest],
        condition_parameters: Sequence[torch.Tensor | None] | None = None,
        adapters: Sequence[LoadedAdapter | None] | None = None,
    ) -> list[DenoiseState]:
        """Validate and set up each request. `condition_parameters[i]`, when given, replaces the VAE encoding of
        request i (a latent-cache hit); they must come from `encode_condition_distribution` of the same image.
        `adapters[i]`, when given, is the adapter request i uses (an adapter store's); otherwise the named adapter
        `request.adapter`.

        Each request draws from its own generator seeded by its seed: first the noise over the whole canvas
        (as the official code does with its generator), then the condition-latent sample.
        """
        for request in requests:
            validate_request(request)
        if adapters is None:
            adapters = [self.adapters.get(request.adapter) for request in requests]
        device = self._execution_device
        dtype = self.transformer.dtype
        embeddings = self._encode_prompts_cached(
            [r.prompt for r in requests] + [r.negative_prompt for r in requests if r.uses_cfg]
        )
        channels = self.vae.config.latent_channels
        states = []
        for i, request in enumerate(requests):
            seed = request.seed if request.seed is not None else secrets.randbelow(limits.MAX_SEED)
            generator = torch.Generator("cpu").manual_seed(seed)
            height, width = 2 * (request.size // 16), 2 * (2 * request.size // 16)
            # drawn even when `latents` are given, so the condition sample is the same either way; drawn in float32
            # and rounded, so a seed gives the same noise in every dtype (torch 2.11 draws bfloat16 on the CPU from
            # another sequence than float32; 2.13 rounds the float32 one)
            noise = randn_tensor((1, channels, height, width), generator=generator, device=device,
                                 dtype=torch.float32).to(dtype)
            if request.latents is not None:
                latents = self._check_latents(request.latents, height * width // 4, 4 * channels)
            else:
                latents = pack_latents(noise)
            parameters = condition_parameters[i] if condition_parameters is not None else None
            if parameters is None:
                parameters = self.encode_condition_distribution(request.image, request.size)
            condition = self.condition_latents(parameters.to(device), generator).to(dtype)
            timesteps, sigmas = self.schedule(request.num_inference_steps, latents.shape[1])
            embeds, pooled = embeddings[request.prompt]
            negative = embeddings[request.negative_prompt] if request.uses_cfg else (None, None)
            states.append(
                DenoiseState(
                    request=request,
                    seed=seed,
                    latents=latents,
                    condition=condition,
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    negative_prompt_embeds=negative[0],
                    negative_pooled_prompt_embeds=negative[1],
                    timesteps=timesteps,
                    sigmas=sigmas,
                    adapter=adapters[i],
                )
            )
        return states

    def _check_latents(self, latents: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
        expected = (1, tokens, channels)
        if tuple(latents.shape) != expected:
            raise InputError("latents", f"shape {tuple(latents.shape)} does not match the packed canvas {expected}")
        return latents.to(device=self._execution_device, dtype=self.transformer.dtype)

    @torch.no_grad()
    def step(self, states: Sequence[DenoiseState]) -> None:
        """Advance every state by one denoising step.

        States may differ in prompt, seed, step count, position in their schedule, guidance and CFG scales, adapter
        (each adapter's LoRA applies to its own rows, see `dsd_model.adapters`) and canvas size (rows of smaller
        canvases are packed into the largest canvas's token grid, see `CanvasPacking`). A CFG state contributes three
        rows (negative prompt without condition, negative prompt with condition, prompt with condition). The states
        share one transformer forward, except that each `exact` request gets a forward of its own, which makes its
        result byte-identical to the request run alone. The step is all or nothing: if a forward raises, no state
        moves.
        """
        if not states:
            return
        states = sorted(states, key=adapter_order)  # the rows of one adapter are one segment
        shared = [s for s in states if not s.request.exact]
        groups = ([shared] if shared else []) + [[s] for s in states if s.request.exact]
        updated = [(state, result) for group in groups for state, result in zip(group, self._updated_latents(group))]
        for state, (latents, preview) in updated:
            state.latents = latents
            state.step_index += 1
            if preview is not None:
                state.extras["preview"] = preview

    def _updated_latents(self, states: Sequence[DenoiseState]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The latents of `states` after one Euler step, from one batched forward over their rows, each with the
        clean-image estimate `x0 = x_t - sigma_t * v` (v the guided prediction) when the state's request wants a
        preview after this step, else None."""
        hidden, text, pooled, timestep, guidance = [], [], [], [], []
        for state in states:
            x, c = state.latents, state.condition
            t = state.timesteps[state.step_index].expand(1).to(x.dtype)
            g = torch.full((1,), state.request.guidance_scale, device=x.device, dtype=torch.float32)
            if state.rows == 3:
                hidden += [torch.cat([x, torch.zeros_like(c)], dim=2), torch.cat([x, c], dim=2)]
                text += [state.negative_prompt_embeds] * 2
                pooled += [state.negative_pooled_prompt_embeds] * 2
                timestep += [t, t]
                guidance += [g, g]
            hidden.append(torch.cat([x, c], dim=2))
            text.append(state.prompt_embeds)
            pooled.append(state.pooled_prompt_embeds)
            timestep.append(t)
            guidance.append(g)

        row_sizes = [state.request.size for state in states for _ in range(state.rows)]
        packing = CanvasPacking(row_sizes, text[0].shape[1]) if len(set(row_sizes)) > 1 else None
        size = max(row_sizes)
        height, width = 2 * (size // 16), 2 * (2 * size // 16)
        dtype = self.transformer.dtype
        device = states[0].latents.device  # `_execution_device` walks every module of every component
        with self.adapters.rows([state.adapter for state in states for _ in range(state.rows)]):
            prediction = self._forward(
                (packing.pack(hidden) if packing is not None else torch.cat(hidden)).to(dtype),
                torch.cat(timestep) / 1000,
                torch.cat(guidance) if self.transformer.config.guidance_embeds else None,
                torch.cat(pooled).to(dtype),
                torch.cat(text).to(dtype),
                latent_image_ids(height, width, device, dtype),
                torch.zeros(text[0].shape[1], 3, device=device, dtype=dtype),
                states,
                packing.attention_mask if packing is not None else None,
            )

        updated = []
        row = 0
        for state in states:
            rows = prediction[row : row + state.rows]
            if packing is not None:
                rows = packing.unpack(rows, state.request.size)
            row += state.rows
            if state.rows == 3:
                u, u_t, v = rows.chunk(3)
                r = state.request
                pred = u + r.image_guidance_scale * (u_t - u) + r.text_guidance_scale * (v - u_t)
            else:
                pred = rows
            sigma = state.sigmas[state.step_index]
            sigma_next = state.sigmas[state.step_index + 1]
            latents = state.latents.to(torch.float32)
            preview = latents - sigma * pred if state.step_index + 1 in state.request.preview_steps else None
            updated.append(((latents + (sigma_next - sigma) * pred).to(pred.dtype), preview))
        return updated

    def _forward(self, hidden, timestep, guidance, pooled, text, img_ids, txt_ids, states,
                 attention_mask=None) -> torch.Tensor:
        """The transformer's prediction for the rows of `states` (in `step`'s row order); `attention_mask` (packed
        canvases, `CanvasPacking`) hides each row's padding. `self.denoiser` (`acceleration.Denoiser`: bucketed rows,
        per-row step cache), when set, makes the call.

        A forward that applies LoRA per row (mixed adapters, or an adapter unfused) runs its blocks eagerly: compiled
        blocks are compiled for bare modules, and tracing the per-row hooks would specialise them on every layout of
        rows (a recompilation per layout, measured in the GPU check's rehearsal)."""
        eager = torch.compiler.set_stance("force_eager") if self.adapters.lora_hooked else contextlib.nullcontext()
        with eager:
            if self.denoiser is not None:
                return self.denoiser(hidden, timestep, guidance, pooled, text, img_ids, txt_ids, states, self.adapters,
                                     attention_mask)
            return self.transformer(
                hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=text, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                joint_attention_kwargs={"attention_mask": attention_mask} if attention_mask is not None else None,
            )[0]

    def decode(self, state: DenoiseState) -> torch.Tensor:
        """Decoded canvas (or its right half) in [-1, 1], shape [1, 3, H, W]."""
        return self._decode_latents(state.latents, state.request)

    @torch.no_grad()
    def _decode_latents(self, packed: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        size = request.size
        latents = unpack_latents(packed, 2 * (size // 16), 2 * (2 * size // 16))
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return image if request.full_canvas else image[..., size:]

    def finish(self, state: DenoiseState) -> Image.Image:
        """The generated image of a finished state."""
        if not state.done:
            raise ValueError(f"state is at step {state.step_index} of {state.num_steps}; finish it first")
        return to_pil(self.decode(state))[0]

    def preview(self, state: DenoiseState) -> Image.Image:
        """The clean-image estimate `step` kept for this state (`GenerationRequest.preview_steps`), decoded like
        `finish` decodes the final latents; the estimate is dropped from the state."""
        if "preview" not in state.extras:
            raise ValueError(f"state at step {state.step_index} holds no preview; request one with preview_steps")
        return to_pil(self._decode_latents(state.extras.pop("preview"), state.request))[0]

    # ------------------------------------------------------------------ adapters

    def to(self, *args, **kwargs):
        """`DiffusionPipeline.to`, with the loaded adapters following the transformer's device and dtype."""
        moved = super().to(*args, **kwargs)
        moved.adapters.follow_transformer()
        return moved

    def load_adapter(self, source, name: str) -> None:
        """Load a LoRA adapter file (official layout or ours) or state dict under `name`; requests (and `adapter=`)
        then name it."""
        self.adapters.load(source, name)

    def set_adapter(self, name: str | None) -> None:
        """Apply adapter `name` (None: the base model) to every row of direct transformer calls; the pipeline's own
        steps apply each request's adapter to its rows whatever is set here."""
        self.adapters.activate(name)

    # ------------------------------------------------------------------ the plain call

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | str | bytes | Sequence[Image.Image | str | bytes],
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        num_inference_steps: int | Sequence[int] = 28,
        guidance_scale: float | Sequence[float] = 3.5,
        image_guidance_scale: float | Sequence[float] = 1.0,
        text_guidance_scale: float | Sequence[float] = 1.0,
        size: int | None = None,
        seed: int | Sequence[int | None] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        full_canvas: bool = False,
        adapter: str | None = None,
        exact: bool | Sequence[bool] = False,
        output_type: str = "pil",
        callback_on_step_end: Callable[["DSDPipeline", int, list[DenoiseState]], None] | None = None,
        return_dict: bool = True,
    ):
        r"""Generate images of the references' subjects following the prompts.

        Every per-image argument takes one value for all images or a list with one value per image; `image` and
        `prompt` lists set the batch size (a single image or prompt is repeated). `seed` (or `generator`, from which
        a seed is drawn) makes a result reproducible; `latents` ([B, tokens, channels], packed) replaces the noise.
        `size` is the reference/output side (default 512, the official size; multiples of 16). The output is the
        right half of the decoded canvas, or the whole canvas with `full_canvas=True`. `output_type`: "pil", "pt"
        (float tensors in [0, 1]) or "np".

        Images that share a forward may differ from the same image generated alone by float rounding
        (docs/serving.md, "Reproducibility"); an image with `exact=True` runs in forwards of its own and equals it
        byte for byte.

        `callback_on_step_end(pipe, step, states)` runs after each batched forward.
        """
        # 1. Check inputs and build one request per image
        requests = self._requests(
            image, prompt, negative_prompt, num_inference_steps, guidance_scale, image_guidance_scale,
            text_guidance_scale, size, seed, generator, latents, full_canvas, adapter, exact,
        )
        if output_type not in ("pil", "pt", "np"):
            raise InputError("output_type", f"{output_type!r} is not one of 'pil', 'pt', 'np'")
        prompts = {(name, getattr(r, name)) for r in requests for name in ("prompt", "negative_prompt")}
        for name, text in sorted(prompts):
            for notice in self.check_prompt(text, name) if text else []:
                logger.warning(notice)
        self.adapters.get(adapter)  # an unknown adapter is refused before any work

        # 2-4. Encode prompts and the reference canvases, draw noise, compute each schedule
        states = self.prepare(requests)

        # 5. Denoising loop: every unfinished request advances in one batched forward
        with self.progress_bar(total=max(s.num_steps for s in states)) as progress_bar:
            step = 0
            while not all(s.done for s in states):
                self.step([s for s in states if not s.done])
                if callback_on_step_end is not None:
                    callback_on_step_end(self, step, states)
                step += 1
                progress_bar.update()

        # 6. Decode
        decoded = [self.decode(s) for s in states]
        seeds = [s.seed for s in states]
        self.maybe_free_model_hooks()
        if output_type == "pil":
            images = [to_pil(d)[0] for d in decoded]
        else:
            images = torch.cat([(d.float() / 2 + 0.5).clamp(0, 1) for d in decoded])
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return images, seeds
        return DSDPipelineOutput(images=images, seeds=seeds)

    def _requests(
        self, image, prompt, negative_prompt, steps, guidance, image_guidance, text_guidance, size, seed, generator,
        latents, full_canvas, adapter, exact,
    ) -> list[GenerationRequest]:
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        batch = max(len(images), len(prompts))

        def per_image(name, value):
            if isinstance(value, (list, tuple)):
                if len(value) != batch:
                    raise InputError(name, f"has {len(value)} values for a batch of {batch}")
                return list(value)
            return [value] * batch

        images, prompts = per_image("image", images if len(images) > 1 else images[0]), per_image(
            "prompt", prompts if len(prompts) > 1 else prompts[0]
        )
        if generator is not None and seed is not None:
            raise InputError("generator", "cannot be passed together with `seed`; pass one of the two")
        if generator is not None:
            generators = per_image("generator", generator)
            seeds = [int(torch.randint(0, 2**62, (1,), generator=g).item()) for g in generators]
        else:
            seeds = per_image("seed", seed)
        if latents is not None and latents.shape[0] != batch:
            raise InputError("latents", f"has batch {latents.shape[0]}, expected {batch}")
        size = size if size is not None else 512
        decoded = {}
        for i, img in enumerate(images):
            if id(img) not in decoded:
                decoded[id(img)] = decode_image(img, f"image[{i}]")
        return [
            GenerationRequest(
                image=decoded[id(img)],
                prompt=p,
                negative_prompt=n,
                num_inference_steps=s,
                guidance_scale=g,
                image_guidance_scale=ig,
                text_guidance_scale=tg,
                size=size,
                seed=sd,
                latents=latents[i : i + 1] if latents is not None else None,
                full_canvas=full_canvas,
                adapter=adapter,
                exact=ex,
            )
            for i, (img, p, n, s, g, ig, tg, sd, ex) in enumerate(
                zip(
                    images, prompts, per_image("negative_prompt", negative_prompt),
                    per_image("num_inference_steps", steps), per_image("guidance_scale", guidance),
                    per_image("image_guidance_scale", image_guidance), per_image("text_guidance_scale", text_guidance),
                    seeds, per_image("exact", exact),
                )
            )
        ]
