"""Arguments shared by several sub-commands."""
from __future__ import annotations

import argparse

from cmcseg.paths import WorkRoots, resolve_roots


def add_root_arguments(parser: argparse.ArgumentParser) -> None:
    """The three work roots (README, 'Where files go')."""
    g = parser.add_argument_group("work roots (default: $CMCSEG_*, then $nnUNet_*, then ./cmcseg_work/*)")
    g.add_argument("--raw", help="raw datasets root")
    g.add_argument("--preprocessed", help="preprocessed datasets root")
    g.add_argument("--results", help="trained models root")


def roots_from_args(args: argparse.Namespace) -> WorkRoots:
    return resolve_roots(getattr(args, "raw", None), getattr(args, "preprocessed", None), getattr(args, "results", None))
