"""A tiny benchmark: two subjects, two prompts each."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import random_image

SUBJECTS = {"fox": "live", "teapot": "object"}
PROMPTS = ["a {} on the beach", "a {} in the snow"]


def write_tiny_encoders(root: Path) -> tuple[Path, Path]:
    """`root/dino` and `root/clip`: seeded random models with processors (and a tokenizer), loadable by path."""
    torch.manual_seed(0)
    layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    vision = dict(image_size=ENCODER_SIDE, patch_size=8, **layers)
    crop = dict(size={"shortest_edge": ENCODER_SIDE}, crop_size={"height": ENCODER_SIDE, "width": ENCODER_SIDE})
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(root / "dino")
    BitImageProcessorPil(**crop).save_pretrained(root / "dino")
    tokenizer = build_tiny_tokenizers()[0]
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, **layers)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    CLIPImageProcessorPil(**crop).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "dino", root / "clip"


def write_jsonl_benchmark(root: Path) -> Path:
    """Two subjects (one live, one object), two prompts each, 64 px references."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed, (name, category) in enumerate(SUBJECTS.items()):
        random_image(64, 64, seed=seed).save(root / f"{name}.png")
        lines += [{"subject": name, "image": f"{name}.png", "prompt": p.format(name), "category": category}
                  for p in PROMPTS]
    path = root / "benchmark.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path
