"""Entry point of the `cmcseg` command.

Each sub-command lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
This module only wires them up, configures logging, and turns cmcseg's own errors into a
clear message and a non-zero exit code (no traceback for expected problems).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cmcseg import __version__
from cmcseg.cli import (
    convert_cmd,
    demo_cmd,
    evaluate_cmd,
    plan_cmd,
    predict_cmd,
    pretrain_cmd,
    synth_cmd,
    train_cmd,
)
from cmcseg.errors import WRITE_FAULTS, CmcsegError, WriteFaultError

_COMMANDS = (synth_cmd, convert_cmd, plan_cmd, pretrain_cmd, train_cmd, predict_cmd, evaluate_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmcseg",
        description="Self-configuring multimodal segmentation for misaligned sequences, scarce labels and "
                    "missing modalities.",
    )
    parser.add_argument("--version", action="version", version=f"cmcseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS:
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
        p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    try:
        return int(args._run(args) or 0)
    except CmcsegError as e:
        print(f"cmcseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that no cmcseg code wrapped: still say which folder, and what to do
        if e.errno not in WRITE_FAULTS:
            raise
        folder = os.path.dirname(str(e.filename)) if e.filename else "(unknown)"
        print(f"cmcseg {args.command}: error: {WriteFaultError(folder, WRITE_FAULTS[e.errno], e.filename)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cmcseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
