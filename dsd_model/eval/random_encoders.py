"""Random-weight DINOv2 and CLIP encoders written in the transformers layout `Encoders` loads: tiny ones for tests
and the eval split of tiny training runs, real-size ones (DINOv2-base, CLIP ViT-L/14) for measuring what the
embedding scores cost. Random weights give meaningless scores at the real cost; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TINY_SIDE = 32


def write_random_encoders(root: Path, size: Literal["tiny", "real"] = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """`root/dino` and `root/clip`, each a model with its image processor (and CLIP's tokenizer)."""
    from transformers import (
        BitImageProcessorPil,
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    from ..tiny import build_tiny_tokenizers

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizers()[0]
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    if size == "tiny":
        layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
        dino_config = Dinov2Config(image_size=TINY_SIDE, patch_size=8, **layers)
        clip_config = CLIPConfig(text_config={**text, **layers}, projection_dim=16,
                                 vision_config=dict(image_size=TINY_SIDE, patch_size=8, **layers))
        side, short_edge = TINY_SIDE, TINY_SIDE
    else:
        dino_config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                   image_size=518)
        clip_config = CLIPConfig(
            text_config={**text, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12},
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, patch_size=14, image_size=224),
            projection_dim=768,
        )
        side, short_edge = 224, 256
    crop = dict(size={"shortest_edge": short_edge}, crop_size={"height": side, "width": side})
    Dinov2Model(dino_config).save_pretrained(root / "dino")
    BitImageProcessorPil(**crop).save_pretrained(root / "dino")
    CLIPModel(clip_config).save_pretrained(root / "clip")
    CLIPImageProcessorPil(**{**crop, "size": {"shortest_edge": side}}).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "dino", root / "clip"
