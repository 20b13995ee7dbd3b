"""Ramp-up schedules for the weights of the unlabeled (consistency) loss terms.

Semi-supervised terms are unreliable while the network is still random, so their weight
starts near zero and grows to its final value over a ramp-up period (Laine & Aila 2017,
"Temporal ensembling"; Tarvainen & Valpola 2017, "Mean teachers").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RampKind = Literal["sigmoid", "linear", "constant"]
RampUnit = Literal["iteration", "epoch", "fraction"]


def _progress(current: float, rampup_length: float) -> float:
    """Fraction t = clip(current / rampup_length, 0, 1) of the ramp-up done (1 if length is 0)."""
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    return min(max(float(current) / float(rampup_length), 0.0), 1.0)


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Sigmoid-shaped ramp-up of Laine & Aila: ``exp(-5 (1 - t)^2)``, t = clip(current/length, 0, 1).

    Starts at exp(-5) ~= 0.0067 (not exactly 0: this is the published formula) and reaches
    exactly 1 at ``current >= rampup_length``. A length of 0 means no ramp-up (always 1).
    """
    phase = 1.0 - _progress(current, rampup_length)
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(current: float, rampup_length: float) -> float:
    """Linear ramp-up ``t = clip(current / rampup_length, 0, 1)``: exactly 0 at the start, 1 at the end."""
    return _progress(current, rampup_length)


@dataclass(frozen=True)
class RampUp:
    """A ramped loss weight: 0 before ``start``, then ``weight * ramp((step - start) / length)``.

    ``start`` (the warm-up) and ``length`` count ``unit``: iterations, epochs, or ``"fraction"``
    of the whole run (what the trainers use, so that a 5-minute run and a 1000-epoch run follow
    the same curve). The caller passes ``step`` in that same unit; ``unit`` does not change the
    arithmetic, it records what the trainer must pass.
    """

    weight: float = 1.0
    length: float = 40.0
    kind: RampKind = "sigmoid"
    unit: RampUnit = "epoch"
    start: float = 0.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"RampUp.weight must be >= 0, got {self.weight}")
        if self.length < 0:
            raise ValueError(f"RampUp.length must be >= 0, got {self.length}")
        if self.kind not in ("sigmoid", "linear", "constant"):
            raise ValueError(f"RampUp.kind must be 'sigmoid', 'linear' or 'constant', got {self.kind!r}")
        if self.unit not in ("iteration", "epoch", "fraction"):
            raise ValueError(f"RampUp.unit must be 'iteration', 'epoch' or 'fraction', got {self.unit!r}")
        if self.start < 0:
            raise ValueError(f"RampUp.start must be >= 0, got {self.start}")

    def factor(self, step: float) -> float:
        """The ramp value in [0, 1] at ``step`` (without the weight); exactly 0 during the warm-up."""
        if step < self.start:
            return 0.0
        if self.kind == "sigmoid":
            return sigmoid_rampup(step - self.start, self.length)
        if self.kind == "linear":
            return linear_rampup(step - self.start, self.length)
        return 1.0

    def __call__(self, step: float) -> float:
        """The loss weight at ``step``: ``weight * factor(step)``."""
        return self.weight * self.factor(step)
