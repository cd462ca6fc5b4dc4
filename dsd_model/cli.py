"""The `dsd` command: generate, convert, verify, the weights on disk, the data and training stages, and evaluation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from pathlib import Path

from . import limits
from .errors import ContentPolicyError, InputError, WeightsError

OUTPUT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _generate(args: argparse.Namespace) -> None:
    from .images import decode_image
    from .loading import TINY_NOTICE, adapter_for_mode, load_pipeline
    from .serving.outputs import OutputStage
    from .serving.provenance import Claim
    from .settings import Settings

    out = Path(args.out)
    output_format = OUTPUT_FORMATS.get(out.suffix.lower())
    if output_format is None:
        raise InputError("--out", f"suffix {out.suffix!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    settings = Settings()
    provenance_id = f"cli-{uuid.uuid4().hex}"
    image = decode_image(args.image, "--image")
    outputs = OutputStage(settings)
    outputs.safety.check_input(image, consent=args.consent, request_id=provenance_id)
    pipe = load_pipeline(settings)
    adapter = _named_adapter(pipe, settings, args.adapter) if args.adapter else adapter_for_mode(pipe, args.mode)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    result = pipe(
        image,
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        image_guidance_scale=args.image_guidance,
        text_guidance_scale=args.text_guidance,
        size=args.size if args.size is not None else settings.size,
        seed=args.seed,
        full_canvas=args.full_canvas,
        adapter=adapter,
    )
    claim = Claim(request_id=provenance_id, provenance_id=provenance_id, model=outputs.model_name, adapter=adapter,
                  profile=pipe.profile, prompt=args.prompt)
    data = outputs.finish(result.images[0], output_format, claim)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"wrote {out} (seed {result.seeds[0]}, profile {pipe.profile}, adapter {adapter or 'none'}, "
          f"provenance id {provenance_id})")
    if pipe.profile == "tiny":
        print(TINY_NOTICE)


def _named_adapter(pipe, settings, name: str) -> str:
    """`name` among the pipeline's adapters or, loaded now, the adapter store's (DSD_ADAPTER_DIRS)."""
    from .serving.adapter_store import scan

    if name not in pipe.adapters.names:
        file = scan(settings.adapter_dirs).get(name)
        if file is None:
            available = sorted(set(pipe.adapters.names) | set(scan(settings.adapter_dirs)))
            raise InputError("--adapter", f"{name!r} is not an adapter of DSD_ADAPTERS or DSD_ADAPTER_DIRS; adapters: "
                                          f"{', '.join(available) or 'none'}")
        pipe.load_adapter(file.path, name)
    return name


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    print(
        convert_checkpoint(
            args.source, args.destination, to=args.to, fold_lora=args.fold_lora, lora_scale=args.lora_scale
        )
    )


def _verify(args: argparse.Namespace) -> int:
    from .serving.provenance import verify
    from .settings import Settings

    path = Path(args.image)
    if not path.is_file():
        raise InputError("image", f"file {str(path)!r} does not exist")
    settings = Settings()
    service_id = args.service_id or settings.watermark_service_id
    trust_anchors = args.trust_anchors or settings.c2pa_trust_anchors
    report = verify(path.read_bytes(), service_id, trust_anchors)
    print(json.dumps(report, indent=2))
    return 0 if report["watermark"]["present"] or report["c2pa"]["present"] else 1


def _publish(args: argparse.Namespace) -> None:
    from .serving.adapter_store import publish

    target = publish(Path(args.run), args.name, Path(args.store), replace=args.replace)
    print(f"published {target}")


def _list_adapters(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .serving.adapter_store import describe, scan

    files = scan([Path(store) for store in args.stores])
    print(json.dumps([asdict(describe(file)) for _, file in sorted(files.items())], indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image from a reference image and a prompt")
    gen.add_argument("--image", required=True, help="reference image (PNG, JPEG or WebP)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output image path (.png, .jpg or .webp; marked and, when a key "
                     "is configured, signed like the service's outputs)")
    modes = gen.add_mutually_exclusive_group()
    modes.add_argument("--mode", help="identity | structure (selects the adapter); the default adapter when absent")
    modes.add_argument("--adapter", help="an adapter by name: of DSD_ADAPTERS or a file of DSD_ADAPTER_DIRS")
    gen.add_argument("--steps", type=int, default=28, help=f"denoising steps [{limits.MIN_STEPS}, {limits.MAX_STEPS}]")
    gen.add_argument("--seed", type=int, default=None, help="random when absent; always printed")
    gen.add_argument("--guidance", type=float, default=3.5, help="distilled guidance (official: 3.5)")
    gen.add_argument("--image-guidance", type=float, default=1.0, help="true-CFG image scale; CFG runs when > 1")
    gen.add_argument("--text-guidance", type=float, default=1.0, help="true-CFG text scale")
    gen.add_argument("--size", type=int, default=None, help="reference/output side, multiple of 16 (default 512)")
    gen.add_argument("--full-canvas", action="store_true", help="write the whole [reference | output] canvas")
    gen.add_argument("--consent", action="store_true",
                     help="the person shown agreed to this use (needed when the input check flags the reference)")
    gen.set_defaults(handler=_generate)

    conv = sub.add_parser("convert", help="convert DSD / FLUX transformer checkpoints (safetensors only)")
    conv.add_argument("source", help="official DSD or plain FLUX transformer: file, sharded index or directory")
    conv.add_argument("destination", help="output directory")
    conv.add_argument("--to", choices=("fused", "official"), default="fused")
    conv.add_argument("--fold-lora", action="store_true", help="fold LoRA tensors embedded in the source exactly")
    conv.add_argument("--lora-scale", type=float, default=1.0, help="scale of a folded LoRA (official: 1.0)")
    conv.set_defaults(handler=_convert)

    ver = sub.add_parser("verify", help="read an image's provenance: the invisible watermark and C2PA credentials",
                         description="Print the image's provenance as JSON. Exit status: 0 when a watermark of the "
                         "service or C2PA credentials are found, 1 when neither is, 2 when the file cannot be read "
                         "as an image.")
    ver.add_argument("image", help="image file (PNG, JPEG or WebP)")
    ver.add_argument("--service-id", default=None, help="watermark service id (default: DSD_WATERMARK_SERVICE_ID)")
    ver.add_argument("--trust-anchors", default=None,
                     help="PEM root certificates to validate the C2PA signer against (default: DSD_C2PA_TRUST_ANCHORS)")
    ver.set_defaults(handler=_verify)

    adapters = sub.add_parser("adapters", help="adapter stores: publish a trained adapter, list what a store holds")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True)
    pub = adapter_commands.add_parser("publish", help="copy a trained adapter into a store, atomically, with its "
                                      "base transformer digest, training config hash and eval summary")
    pub.add_argument("run", help="a `dsd train` output directory, or an adapter .safetensors file")
    pub.add_argument("name", help="the name requests will use (A-Z a-z 0-9 _ -, at most 64)")
    pub.add_argument("store", help="an adapter store directory (one of the service's DSD_ADAPTER_DIRS)")
    pub.add_argument("--replace", action="store_true", help="replace an adapter of that name (served from its next "
                     "request on, without a restart)")
    pub.set_defaults(handler=_publish)
    listing = adapter_commands.add_parser("list", help="the adapters of store directories, with rank, size, base "
                                          "digest and metadata (JSON)")
    listing.add_argument("stores", nargs="+", help="adapter store directories")
    listing.set_defaults(handler=_list_adapters)

    from .weights.cli import add_weights_commands

    weights = sub.add_parser("weights", help="the weights directory: pull it from a model hub, verify it against its lock")
    add_weights_commands(weights.add_subparsers(dest="weights_command", required=True))

    from .data.cli import add_data_commands

    data = sub.add_parser("data", help="self-distillation data: grid prompts, teacher grids, VLM curation, pairs")
    add_data_commands(data.add_subparsers(dest="data_command", required=True))

    from .training.cli import add_train_command

    add_train_command(sub)

    from .eval.cli import add_eval_commands

    evaluation = sub.add_parser("eval", help="evaluate adapters and services on a benchmark: generate, score, report")
    add_eval_commands(evaluation.add_subparsers(dest="eval_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its handler returns the exit status, or None for 0. A refused input is 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (InputError, WeightsError, ContentPolicyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
