"""The ``bksdm`` command line: parses arguments and dispatches to the library and recipes.

Every subcommand is ``bksdm <command> ...``; ``main(argv)`` is what tests call in-process. A
:class:`~bksdm.errors.UserError` ends the command with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from bksdm.errors import USER_ERROR_EXIT, UserError

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``add_arguments`` / ``run`` pair for a subcommand (decorates the argument builder)."""

    def wrap(add_arguments):
        def bind(run):
            _COMMANDS[name] = (help, add_arguments, run)
            return run

        add_arguments.run = bind
        return add_arguments

    return wrap


# ---------------------------------------------------------------- compress
@command("compress", "remove blocks from a teacher U-Net and initialise the student from its weights")
def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher pipeline: a local diffusers folder or a hub id")
    p.add_argument("--student", required=True, help="bk-base, bk-small, bk-tiny, or a spec file (.yaml/.json)")
    p.add_argument("--out", required=True, help="output folder: a complete diffusers pipeline with the student U-Net")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")


@_compress_args.run
def _compress(a: argparse.Namespace) -> int:
    from bksdm.compress import compress

    rec = compress(a.teacher, a.student, a.out, overwrite=a.overwrite)
    p = rec["params"]
    print(f"{rec['spec']['name']}: U-Net {p['teacher_unet']:,} -> {p['student_unet']:,} parameters "
          f"({len(rec['key_map'])} tensors from the teacher, {len(rec['unused_teacher_keys'])} left out); wrote {a.out}")
    return 0


# ---------------------------------------------------------------- profile
@command("profile", "parameters, MACs and latency per component and per image (paper Table 1)")
def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="teacher family built with random weights: sd-v1, sd-v2-base, sd-v2")
    p.add_argument("--student", nargs="*", default=[], help="specs applied to --arch (bk-base bk-small bk-tiny or files)")
    p.add_argument("--model", nargs="*", default=[], help="pipeline folders or hub ids to profile (their real weights)")
    p.add_argument("--no-latency", action="store_true", help="count parameters and MACs only")
    p.add_argument("--dtypes", nargs="+", default=None, help="latency precisions (default: fp32 bf16 on CPU, fp32 fp16 on GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of a whole image")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON record per model instead of a table")


@_profile_args.run
def _profile(a: argparse.Namespace) -> int:
    from bksdm.profile import profile_models

    if not a.arch and not a.model:
        raise UserError("profile needs --arch (sd-v1, sd-v2-base, sd-v2) or --model FOLDER")
    records = profile_models(a.arch, a.student, a.model, latency=not a.no_latency, dtypes=a.dtypes,
                             device=a.device, steps=a.steps, runs=a.runs)
    if a.json:
        for r in records:
            print(json.dumps(r))
    else:
        from bksdm.profile import format_table

        print(format_table(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="bksdm", description="BK-SDM: block-removed, distilled Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_arguments, _) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=help_))
    return parser


_COMMAND_MODULES: tuple[str, ...] = ()


def _load_commands() -> None:
    """Import the modules whose CLI registrations live next to their recipes."""
    import importlib

    for mod in _COMMAND_MODULES:
        importlib.import_module(mod)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command][2](args) or 0
    except UserError as exc:
        print(f"bksdm {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
