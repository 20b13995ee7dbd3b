"""Arguments shared by several sub-commands."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from cmcseg.paths import WorkRoots, resolve_roots


def add_root_arguments(parser: argparse.ArgumentParser) -> None:
    """The three work roots (README, 'Where files go')."""
    g = parser.add_argument_group("work roots (default: $CMCSEG_*, then $nnUNet_*, then ./cmcseg_work/*)")
    g.add_argument("--raw", help="raw datasets root")
    g.add_argument("--preprocessed", help="preprocessed datasets root")
    g.add_argument("--results", help="trained models root")


def roots_from_args(args: argparse.Namespace) -> WorkRoots:
    return resolve_roots(getattr(args, "raw", None), getattr(args, "preprocessed", None),
                         getattr(args, "results", None))


def int_at_least(minimum: int, example: str):
    """An argparse ``type``: an integer >= ``minimum``; anything else is refused at parsing with a clear message.

    ``example`` shows a valid use in the message (e.g. ``"--epochs 100"``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass e.g. {example}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}, the smallest value that makes sense "
                                             f"here; pass e.g. {example}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its own messages
    return parse


def float_in(low: float, high: float | None, example: str, low_inclusive: bool = False):
    """An argparse ``type``: a finite number in (low, high] (``[low, high]`` with ``low_inclusive``;
    no upper bound with ``high=None``), refused at parsing otherwise."""
    interval = f"{'[' if low_inclusive else '('}{low:g}, {'inf)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass e.g. {example}") from None
        above_low = value >= low if low_inclusive else value > low
        if not (math.isfinite(value) and above_low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}; pass e.g. {example}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def key_value(text: str) -> tuple[str, Any]:
    """An argparse ``type`` for ``KEY=VALUE``: VALUE read as JSON (numbers, booleans, lists), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE; pass e.g. feature_size=48")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def add_unsafe_pickle_argument(parser: argparse.ArgumentParser) -> None:
    """``--unsafe-allow-pickle``: the one way to read a checkpoint or weights file that holds Python objects."""
    parser.add_argument(
        "--unsafe-allow-pickle", action="store_true",
        help="read checkpoints and weight files with full unpickling, which RUNS ANY CODE hidden in them. Only for "
             "files you made or fully trust (e.g. a checkpoint of cmcseg before format 2). Without it such a file "
             "is refused and nothing in it runs")
