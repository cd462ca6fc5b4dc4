"""`dsd eval ...`: run contenders over a benchmark and report on the runs.

Every setting is an `EvalSettings` field, read from `DSD_EVAL_*` variables; a flag given on the command line wins.
API keys are read from the environment only. Local contenders use the service settings (`DSD_MODEL_DIR`,
`DSD_ADAPTERS`, ...; the tiny profile when unset).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.chat import ChatError
from ..data.settings import ChatSettings
from ..errors import InputError
from ..settings_flags import add_settings_flags, settings_from_args
from .contenders import ContenderError, parse_contender
from .settings import EvalSettings

_CHAT = tuple(ChatSettings.model_fields)
_RUN = tuple(name for name in EvalSettings.model_fields if name not in _CHAT and not name.endswith("api_key")) + _CHAT


def add_eval_commands(subparsers) -> None:
    """Register `run` and `report` on an argparse subparsers object; each sets `handler`."""
    run = subparsers.add_parser("run", help="generate each contender's images of a benchmark and score them")
    run.add_argument("benchmark", type=Path, help="benchmark: a .jsonl file, a DreamBench or a DreamBench++ folder")
    run.add_argument("--contender", action="append", required=True, metavar="NAME=SPEC",
                     help="repeatable; SPEC: local, local:base, local:<adapter>, local:<file>.safetensors, "
                     "http://host:port, grpc://host:port")
    add_settings_flags(run, EvalSettings, _RUN, "settings (flags override DSD_EVAL_* environment variables)")
    run.set_defaults(handler=_run)

    report = subparsers.add_parser("report", help="tables, paired comparisons, contact sheets and plots of runs")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None, help="output directory (default: <first RUN_DIR>/report)")
    report.add_argument("--confidence", type=float, default=0.95, help="interval level and 1 - test level")
    report.set_defaults(handler=_report)


def _run(args: argparse.Namespace) -> None:
    from .run import run_eval

    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_from_args(EvalSettings, args)
    contenders = {}
    for name, spec in map(parse_contender, args.contender):
        if name in contenders:
            raise InputError("contender", f"{name!r} is named twice; give each contender its own name")
        contenders[name] = spec
    try:
        print(run_eval(settings, args.benchmark, contenders))
    except (ChatError, ContenderError) as exc:
        raise SystemExit(f"error: {exc} (finished work is kept; rerun the same command to resume)") from exc
    print(f"run directory {settings.run_dir}; next: dsd eval report {settings.run_dir}")


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    if not 0.5 <= args.confidence < 1:
        raise InputError("confidence", f"must be in [0.5, 1), got {args.confidence}")
    out = args.out or args.run_dirs[0] / "report"
    build_report(args.run_dirs, out, args.confidence)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {out}")
