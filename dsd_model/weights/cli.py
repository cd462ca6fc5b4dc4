"""`dsd weights pull` and `dsd weights verify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .lock import LOCK_NAME, verify

_PULL_EPILOG = """\
The token comes from HF_TOKEN (or huggingface_hub's stored login) or --token-file, never from the command line, so
it shows in no process list. FLUX.1-dev is gated: accept its licence on its page with the token's account first.
Pin every repository for a reproducible directory, e.g.
  --revision black-forest-labs/FLUX.1-dev=<commit> --revision primecai/dsd_model=<commit>
The lock file records the commits a pull used, pinned or not."""


def _pull(args: argparse.Namespace) -> int:
    from .pull import DEFAULT_LORAS, parse_pairs, pull, read_token, settings_lines

    loras = parse_pairs(args.lora or list(DEFAULT_LORAS), "--lora")
    lock = pull(args.directory, base=args.base, transformer=args.transformer, loras=loras,
                revisions=parse_pairs(args.revision, "--revision"), token=read_token(args.token_file))
    size = sum(entry.size for entry in lock.files)
    print(f"wrote {len(lock.files)} files ({size / 1e9:.2f} GB) and {Path(args.directory) / LOCK_NAME}; serve them with")
    print("\n".join(settings_lines(args.directory, args.base, list(loras))))
    return 0


def _verify(args: argparse.Namespace) -> int:
    result = verify(args.directory, full=args.full)
    for line in result.lines():
        print(line)
    what = "sizes and sha256" if args.full else "sizes"
    if result.ok:
        print(f"{args.directory}: {result.checked} files match {LOCK_NAME} ({what})")
        return 0
    print(f"{args.directory}: {len(result.missing)} missing, {len(result.changed)} changed, {len(result.extra)} extra "
          f"of {result.checked} locked files ({what})", file=sys.stderr)
    return 1


def add_weights_commands(subparsers) -> None:
    from .pull import DEFAULT_BASE, DEFAULT_LORAS, DEFAULT_TRANSFORMER

    pull = subparsers.add_parser(
        "pull", help="download FLUX.1-dev, the DSD transformer and LoRA files into DIR and write weights.lock.json",
        epilog=_PULL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("directory", type=Path, help="weights directory (created; a pull into it again resumes)")
    pull.add_argument("--base", default=DEFAULT_BASE,
                      help="diffusers pipeline repository; all but its transformer goes to DIR/<its name>/")
    pull.add_argument("--transformer", default=DEFAULT_TRANSFORMER, metavar="REPO:FOLDER",
                      help="the DSD transformer's folder, written to DIR/dsd/transformer/")
    pull.add_argument("--lora", action="append", default=[], metavar="NAME=REPO:FILE",
                      help=f"a LoRA file, written to DIR/dsd/NAME.safetensors; repeat for more (default: "
                      f"{DEFAULT_LORAS[0]})")
    pull.add_argument("--revision", action="append", default=[], metavar="REPO=REVISION",
                      help="pin a repository to a commit (or a tag or branch); default main")
    pull.add_argument("--token-file", type=Path, default=None, help="file holding the hub token (default: HF_TOKEN)")
    pull.set_defaults(handler=_pull)

    check = subparsers.add_parser("verify", help="check DIR against its weights.lock.json")
    check.add_argument("directory", type=Path)
    check.add_argument("--full", action="store_true", help="compare sha256 too (reads every byte), not only sizes")
    check.set_defaults(handler=_verify)
