"""One training step from the embedding cache (`dsd train-cache`) against one that runs the encoders.

Per model: the weights training no longer holds (VAE encoder, CLIP-L, T5), the seconds the encoders take per step
and the seconds of a whole step (inputs, forward, backward) both ways, measured side by side in one run. Models:

- tiny: the tiny profile.
- real-size: FLUX.1-dev's VAE and CLIP-L at full size and the DSD transformer and T5-XXL at full width, with
  random weights and fewer blocks (`--blocks`, `--t5-layers`) so a CPU runs them. The weight column counts the
  full T5-XXL (24 layers, built on the meta device); the time columns are for the layers actually run.

    python benchmarks/embedding_cache.py [--size 64] [--t5-tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dsd_model.data.pairs import Pair, write_pairs
from dsd_model.pipeline import DSDPipeline
from dsd_model.tiny import build_real_size_transformer, build_real_size_vae, build_tiny_components
from dsd_model.training import TrainConfig
from dsd_model.training.dataset import PairDataset
from dsd_model.training.embedding_cache import EmbeddingCache, encoder_identity, write_cache
from dsd_model.training.lora import trainable_adapter
from dsd_model.training.objective import flow_matching_inputs, flow_matching_loss

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)


def real_size_pipeline(blocks: int, t5_layers: int) -> tuple[DSDPipeline, int]:
    """Real-size components with random weights; also the parameter count of the full T5-XXL."""
    tiny = build_tiny_components()
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    t5 = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": t5_layers})).eval()
    with torch.device("meta"):
        full_t5 = sum(p.numel() for p in T5EncoderModel(T5Config(**T5_XXL)).parameters())
    pipe = DSDPipeline(
        scheduler=tiny["scheduler"], vae=build_real_size_vae(), text_encoder=clip, tokenizer=tiny["tokenizer"],
        text_encoder_2=t5, tokenizer_2=tiny["tokenizer_2"],
        transformer=build_real_size_transformer(num_layers=blocks, num_single_layers=blocks),
    )
    return pipe, full_t5


def write_dataset(directory: Path, size: int, pairs: int = 4) -> Path:
    rng = np.random.default_rng(0)
    (directory / "images").mkdir(parents=True)
    records = []
    for i in range(pairs):
        for role in ("ref", "tgt"):
            image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            image.save(directory / f"images/{i}{role}.png")
        records.append(Pair(id=f"p{i}", reference=f"images/{i}ref.png", target=f"images/{i}tgt.png",
                            caption=f"a photo of object number {i} on a wooden table, seen from the left"))
    write_pairs(directory, records)
    return directory


def median_seconds(first, second, repeats: int) -> tuple[float, float]:
    """Median wall times of two functions, called alternately after one warm-up call each, so a change in the
    machine's load touches both alike."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for function, record in zip((first, second), times, strict=True):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return tuple(sorted(record)[len(record) // 2] for record in times)


def measure(name: str, pipe: DSDPipeline, encoder_params: int, dataset_dir: Path, size: int, repeats: int) -> dict:
    config = TrainConfig(dataset=dataset_dir, size=size, rank=16, batch_size=1, gradient_checkpointing=False,
                         text_dropout=0.0, text_and_condition_dropout=0.0)
    dataset = PairDataset(dataset_dir, size)
    with tempfile.TemporaryDirectory() as cache_dir:
        write_cache(pipe, dataset, Path(cache_dir))
        cache = EmbeddingCache(cache_dir, encoder_identity(pipe, size, None), [p.id for p in dataset.pairs])
        with trainable_adapter(pipe.transformer, config, torch.float32):

            def step(batch):
                inputs = flow_matching_inputs(pipe, batch, config, torch.Generator().manual_seed(0))
                flow_matching_loss(pipe.transformer, inputs).backward()
                pipe.transformer.zero_grad(set_to_none=True)

            steps = median_seconds(lambda: step(dataset.batch([0])), lambda: step(cache.batch([0])), repeats)
            inputs = median_seconds(
                lambda: flow_matching_inputs(pipe, dataset.batch([0]), config, torch.Generator()),
                lambda: flow_matching_inputs(pipe, cache.batch([0]), config, torch.Generator()),
                repeats,
            )
    return {"model": name, "weights": encoder_params * 4 / 2**20, "bf16": encoder_params * 2 / 2**20,
            "inputs": inputs, "step": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="panel side in pixels (canvas size x 2*size)")
    parser.add_argument("--t5-tokens", type=int, default=128, help="T5 length of the real-size run (FLUX: 512)")
    parser.add_argument("--blocks", type=int, default=1, help="double and single blocks of the real-size model")
    parser.add_argument("--t5-layers", type=int, default=1, help="T5 layers run in the real-size model (of 24)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = write_dataset(Path(tmp) / "pairs", args.size)
        tiny = DSDPipeline(**build_tiny_components())
        tiny_params = sum(p.numel() for m in (tiny.vae.encoder, tiny.text_encoder, tiny.text_encoder_2)
                          for p in m.parameters())
        rows.append(measure("tiny (T5 512 tokens)", tiny, tiny_params, dataset_dir, args.size, args.repeats))
        real, full_t5 = real_size_pipeline(args.blocks, args.t5_layers)
        real.max_sequence_length = args.t5_tokens
        real_params = full_t5 + sum(p.numel() for m in (real.vae.encoder, real.text_encoder) for p in m.parameters())
        label = f"real-size ({args.blocks}+{args.blocks} blocks, T5 {args.t5_layers}/24 layers, {args.t5_tokens} tok)"
        rows.append(measure(label, real, real_params, dataset_dir, args.size, args.repeats))

    print(f"\nTraining step at {args.size} px panels, batch 1, median of {args.repeats} (CPU, "
          f"{torch.get_num_threads()} threads)\n")
    print("| model | encoder weights not held (fp32 / bf16 MiB) | inputs: encoded / cached s | "
          "step: encoded / cached s | step time saved |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        (ie, ic), (se, sc) = row["inputs"], row["step"]
        print(f"| {row['model']} | {row['weights']:,.1f} / {row['bf16']:,.1f} | {ie:.4f} / {ic:.4f} | "
              f"{se:.3f} / {sc:.3f} | {se - sc:.3f} s ({(se - sc) / se:.0%}) |")


if __name__ == "__main__":
    main()
