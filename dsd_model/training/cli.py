"""`dsd train`: one option per `TrainConfig` field (`--max-steps`, `--rank`, ...), read from a JSON file with
`--config` and overridden by the options given. The base model is the tiny profile unless `--model-dir` names a
local FLUX.1-dev directory. `dsd train-cache` writes the embedding cache `--embedding-cache` trains from."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from ..errors import WeightsError
from .config import TrainConfig
from .errors import TrainingError

TINY_NOTE = (
    "training the built-in tiny model (random weights, a few hundred KB): the adapter fits only the tiny profile. "
    "Pass --model-dir to train on FLUX.1-dev."
)


def add_train_command(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the `dsd` command's subparsers; its handler is `run_train(args)`."""
    parser = subparsers.add_parser("train", help="train a DSD LoRA adapter on a paired dataset", description=__doc__)
    parser.add_argument("dataset", type=Path, help=TrainConfig.model_fields["dataset"].description)
    parser.add_argument("--config", type=Path, help="JSON file of settings (e.g. a run's config.json)")
    parser.add_argument(
        "--model-dir", type=Path, help="local FLUX.1-dev directory (diffusers layout). Default: the tiny profile."
    )
    parser.add_argument(
        "--transformer-path", type=Path, help="DSD transformer weights. Default: <model-dir>/dsd_transformer."
    )
    for name, field in TrainConfig.model_fields.items():
        if name != "dataset":
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                                help=f"{field.description} Default: {field.default}.".replace("%", "%%"),
                                **_argument_kind(field.annotation))
    parser.set_defaults(handler=run_train)
    _add_cache_command(subparsers)
    return parser


def _add_cache_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-cache", help="precompute the VAE posteriors and prompt embeddings of a dataset for training",
        description="Encode every pair of DATASET once into OUTPUT (sharded safetensors); `dsd train DATASET "
        "--embedding-cache OUTPUT` then trains without the VAE encoder and the text encoders.",
    )
    parser.add_argument("dataset", type=Path, help=TrainConfig.model_fields["dataset"].description)
    parser.add_argument("output", type=Path, help="cache directory to write")
    parser.add_argument("--size", type=int, default=TrainConfig.model_fields["size"].default,
                        help="panel side in pixels, as `dsd train --size` will use it")
    parser.add_argument("--model-dir", type=Path, help="local FLUX.1-dev directory. Default: the tiny profile.")
    parser.add_argument("--transformer-path", type=Path, help="DSD transformer weights (its dtype and device).")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per encoder call (default 4)")
    parser.add_argument("--shard-pairs", type=int, default=256, help="pairs per safetensors file (default 256)")
    parser.set_defaults(handler=run_cache)


def run_cache(args: argparse.Namespace) -> None:
    from ..pipeline import DSDPipeline
    from .dataset import PairDataset
    from .embedding_cache import write_cache

    try:
        dataset = PairDataset(args.dataset, TrainConfig(dataset=args.dataset, size=args.size).size)
        pipe = _base_pipeline(args)
        if pipe is None:
            from ..tiny import build_tiny_components

            pipe = DSDPipeline(**build_tiny_components())
        index = write_cache(pipe, dataset, args.output, args.model_dir, args.shard_pairs, args.batch_size)
    except (ValidationError, TrainingError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote the embeddings of {len(dataset)} pairs to {index.parent}")


def _argument_kind(annotation) -> dict:
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": typing.get_args(annotation)}
    if any(typing.get_origin(a) is list for a in typing.get_args(annotation)):
        return {"nargs": "+"}
    return {}


def run_train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .trainer import check_requirements, train

    values = json.loads(args.config.read_text()) if args.config else {}
    values.update({name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)})
    try:
        config = TrainConfig(**values)
        check_requirements(config)
        result = train(config, _base_pipeline(args))
    except (ValidationError, TrainingError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if PartialState().is_main_process:  # one line per run, not per process of a launch
        print(f"wrote {result.adapter_path} after {result.steps} steps (final loss {result.losses[-1]:.4f}); "
              f"loss curve {result.output_dir / 'loss.png'}")


def _base_pipeline(args: argparse.Namespace):
    if args.model_dir is None:
        print(TINY_NOTE, file=sys.stderr)
        return None
    from ..loading import load_pipeline
    from ..settings import Settings

    settings = Settings(
        profile="real", model_dir=args.model_dir, transformer_path=args.transformer_path, adapters={},
        default_adapter=None, fuse_adapters=False,
    )
    if getattr(args, "embedding_cache", None) is not None:
        return _pipeline_without_encoders(settings)
    return load_pipeline(settings)


def _pipeline_without_encoders(settings):
    """The base model for training from an embedding cache: the transformer and the scheduler. T5 (4.7B
    parameters) is not loaded; the VAE (its encoder dropped after loading) and CLIP-L stay, since the pipeline
    reads its shapes from their configs."""
    from ..convert import load_dsd_transformer
    from ..pipeline import DSDPipeline

    dtype = settings.resolved_dtype()
    transformer, _ = load_dsd_transformer(settings.transformer_path or settings.model_dir / "dsd_transformer",
                                          dtype=dtype)
    pipe = DSDPipeline.from_pretrained(settings.model_dir, transformer=transformer, text_encoder_2=None,
                                       tokenizer_2=None, torch_dtype=dtype, local_files_only=True)
    del pipe.vae.encoder
    return pipe.to(settings.resolved_device())
