"""Components built in-process: the tiny profile (tests, CI, out-of-the-box serving) and real-size random weights
(benchmarks that need FLUX.1-dev's cost profile).

Everything is deterministic: fixed seeds, locally built character-level tokenizers, identical on every machine.
Tiny components produce noise-like images; that is expected.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

TINY_SEED = 0
TINY_LATENT_CHANNELS = 4

FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
"""FLUX.1-dev's scheduler/scheduler_config.json."""

FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
"""FLUX.1-dev's vae/config.json."""

FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FLUX.1-dev's transformer/config.json."""


def dsd_transformer_config(base: dict) -> dict:
    """The DSD transformer: the same model with the condition latents concatenated on the channel axis."""
    config = dict(base)
    packed = config["in_channels"]
    config.update(in_channels=2 * packed, out_channels=packed)
    return config


def tiny_transformer_config() -> dict:
    return dict(
        patch_size=1,
        in_channels=4 * TINY_LATENT_CHANNELS,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_vae_config() -> dict:
    return dict(
        FLUX_VAE_CONFIG,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
    )


_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def build_tiny_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """Character-level CLIP and T5 tokenizers built from a fixed alphabet (uppercase folds to lowercase in CLIP)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(char, -2.0) for char in string.ascii_letters + string.digits + string.punctuation]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


def build_tiny_text_encoders(clip_vocab: int, t5_vocab: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    torch.manual_seed(TINY_SEED)
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=clip_vocab,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(TINY_SEED + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return clip.eval(), t5.eval()


def build_tiny_components(dsd: bool = True) -> dict:
    """Every component of a tiny pipeline, keyed as `DSDPipeline` / `FluxPipeline` take them.

    `dsd=True` gives the DSD transformer (condition channels); `False` the plain text-to-image FLUX layout.
    """
    tokenizer, tokenizer_2 = build_tiny_tokenizers()
    text_encoder, text_encoder_2 = build_tiny_text_encoders(len(tokenizer), len(tokenizer_2))
    config = tiny_transformer_config()
    torch.manual_seed(TINY_SEED + 2)
    transformer = FluxTransformer2DModel(**(dsd_transformer_config(config) if dsd else config))
    torch.manual_seed(TINY_SEED + 3)
    vae = AutoencoderKL(**tiny_vae_config())
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def tiny_lora_state_dict(transformer: FluxTransformer2DModel, seed: int, rank: int = 4, std: float = 0.2) -> dict:
    """A seeded LoRA in the official layout on every attention projection, so tiny adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(module, torch.nn.Linear) and is_attention_projection(name):
            a = torch.randn(rank, module.in_features, generator=generator) * std
            b = torch.randn(module.out_features, rank, generator=generator) * std
            state[f"transformer.{name}.lora_A.weight"] = a
            state[f"transformer.{name}.lora_B.weight"] = b
    return state


_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def is_attention_projection(module_name: str) -> bool:
    return any(module_name.endswith("." + p) or module_name == p for p in _ATTENTION_PROJECTIONS)


def build_real_size_transformer(
    num_layers: int = 19, num_single_layers: int = 38, dtype: torch.dtype = torch.float32, seed: int = 0,
    device: str = "cpu",
) -> FluxTransformer2DModel:
    """FLUX.1-dev-sized DSD transformer with random weights (fewer blocks allowed: the full 12B needs 24 GB in bf16).
    `device` is where the weights are initialised (on a GPU in seconds instead of minutes)."""
    torch.manual_seed(seed)
    config = dsd_transformer_config(FLUX_TRANSFORMER_CONFIG)
    config.update(num_layers=num_layers, num_single_layers=num_single_layers)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def build_real_size_vae(dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> AutoencoderKL:
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoencoderKL(**FLUX_VAE_CONFIG).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def write_tiny_classifier(directory: Path, labels: tuple[str, ...] = ("safe", "nsfw"), seed: int = 0) -> Path:
    """A ViT image classifier of a few KB with random weights and the given labels, saved with its image processor
    in transformers layout (what the safety checks load), for tests and trials of the safety checks."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return Path(directory)


def build_real_width_text_encoders(
    clip_vocab: int, t5_vocab: int, num_layers: int = 1, device: str = "cpu"
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Text encoders with FLUX.1-dev's output widths (pooled CLIP 768, T5 4096) but `num_layers` layers: they feed
    a real-size transformer in benchmarks, where prompt encoding is outside the timed denoising loop."""
    torch.manual_seed(TINY_SEED)
    with torch.device(device):
        clip = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768, intermediate_size=3072,
                num_attention_heads=12, num_hidden_layers=num_layers, vocab_size=clip_vocab,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=num_layers, num_heads=64,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
            )
        )
    return clip.eval(), t5.eval()
