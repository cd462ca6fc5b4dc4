"""`dsd data ...`: the self-distillation data pipeline from the command line.

Every setting is a `DataSettings` field, read from `DSD_DATA_*` variables; a flag given on the command line wins.
API keys are read from the environment only, so they never show in a process list.
"""

from __future__ import annotations

import argparse
import json
import logging

from ..settings_flags import add_settings_flags, settings_from_args
from .assemble import build_pairs
from .chat import ChatError
from .curate import CURATION_FILE, curate_grids
from .grids import GRIDS_FILE, render_grids
from .manifest import merge_shards
from .prompts import make_prompts
from .settings import DataSettings
from .structure import make_structure_pairs, write_structure_dataset

_CHAT = (
    "request_timeout_s",
    "max_retries",
    "backoff_s",
    "max_backoff_s",
    "max_reply_attempts",
    "concurrency",
    "cache",
    "cache_dir",
)
_PROMPTS = (
    "work_dir",
    "layout",
    "prompt_backend",
    "caption_filter",
    "llm_base_url",
    "llm_model",
    "llm_temperature",
    "llm_max_tokens",
    *_CHAT,
)
_GRIDS = (
    "work_dir",
    "layout",
    "teacher_dir",
    "teachers",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "max_sequence_length",
    "batch_size",
    "grids_per_prompt",
    "seed",
    "shard_size",
    "device",
    "dtype",
)
_CURATE = (
    "work_dir",
    "curate_backend",
    "embedding_model_dir",
    "consistency_threshold",
    "prefilter",
    "prefilter_threshold",
    "vlm_base_url",
    "vlm_model",
    "vlm_temperature",
    "vlm_max_tokens",
    *_CHAT,
)
_PAIRS = ("work_dir", "dataset_dir", "contact_sheet_limit")
_STRUCTURE = (
    *_GRIDS,
    "dataset_dir",
    "recipe",
    "depth_model_dir",
    "control_teacher_dir",
    "control_guidance_scale",
    "structure_min_agreement",
)


def add_data_commands(subparsers) -> None:
    """Register `prompts`, `grids`, `curate`, `merge`, `pairs`, `structure` and `run` (every stage of the recipe in
    order) on an argparse subparsers object; each sets `handler`, a function of the parsed namespace."""
    prompts = subparsers.add_parser("prompts", help="captions → grid prompts (LLM, or the offline template)")
    _add_caption_arguments(prompts)
    _add_settings_flags(prompts, _PROMPTS)
    prompts.set_defaults(handler=_prompts)

    grids = subparsers.add_parser("grids", help="render the grid prompts with the FLUX teacher")
    _add_settings_flags(grids, (*_GRIDS, "shard"))
    grids.set_defaults(handler=_grids)

    curate = subparsers.add_parser(
        "curate", help="judge every panel of every grid (VLM, or offline by panel similarity)"
    )
    _add_settings_flags(curate, (*_CURATE, "shard"))
    curate.set_defaults(handler=_curate)

    merge = subparsers.add_parser(
        "merge", help="fold the manifest shards of `--shard` workers into grids.jsonl and curation.jsonl"
    )
    _add_settings_flags(merge, ("work_dir",))
    merge.set_defaults(handler=_merge)

    pairs = subparsers.add_parser("pairs", help="accepted grids → paired dataset, summary and contact sheet")
    _add_settings_flags(pairs, _PAIRS)
    pairs.set_defaults(handler=_pairs)

    structure = subparsers.add_parser(
        "structure", help="grid prompts → pairs sharing one depth/edge map, differing in appearance or lighting"
    )
    _add_settings_flags(structure, _STRUCTURE)
    structure.set_defaults(handler=_structure)

    run = subparsers.add_parser(
        "run", help="every stage of --recipe in order: prompts, then grids, curate, pairs (identity) or structure"
    )
    _add_caption_arguments(run)
    _add_settings_flags(run, _PROMPTS + _GRIDS + _CURATE + _PAIRS + _STRUCTURE)
    run.set_defaults(handler=_run)


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captions", required=True, help=".txt (one caption per line) or .jsonl file")
    parser.add_argument("--caption-field", default="caption", help="caption key in .jsonl records (default: caption)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N captions")


def _add_settings_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    add_settings_flags(parser, DataSettings, names, "settings (flags override DSD_DATA_* environment variables)")


def _settings(args: argparse.Namespace) -> DataSettings:
    return settings_from_args(DataSettings, args)


def _command(handler):
    """A handler that keeps httpx's per-request log lines out of the progress bars and turns a server that cannot
    serve into a one-line error."""

    def handle(args: argparse.Namespace) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            handler(args)
        except ChatError as exc:
            raise SystemExit(f"error: {exc}") from exc

    return handle


@_command
def _prompts(args: argparse.Namespace) -> None:
    print(make_prompts(_settings(args), args.captions, args.caption_field, args.limit))


@_command
def _grids(args: argparse.Namespace) -> None:
    print(render_grids(_settings(args)))


@_command
def _curate(args: argparse.Namespace) -> None:
    print(curate_grids(_settings(args)))


@_command
def _merge(args: argparse.Namespace) -> None:
    work_dir = _settings(args).work_dir
    for name in (GRIDS_FILE, CURATION_FILE):
        print(f"{name}: merged {merge_shards(work_dir / name)} shard file(s)")


@_command
def _pairs(args: argparse.Namespace) -> None:
    print(json.dumps(build_pairs(_settings(args)), indent=2))


@_command
def _structure(args: argparse.Namespace) -> None:
    settings = _settings(args)
    print(make_structure_pairs(settings))
    print(json.dumps(write_structure_dataset(settings), indent=2))


@_command
def _run(args: argparse.Namespace) -> None:
    settings = _settings(args)
    print(make_prompts(settings, args.captions, args.caption_field, args.limit))
    if settings.recipe != "identity":
        print(make_structure_pairs(settings))
        print(json.dumps(write_structure_dataset(settings), indent=2))
        return
    print(render_grids(settings))
    print(curate_grids(settings))
    print(json.dumps(build_pairs(settings), indent=2))
