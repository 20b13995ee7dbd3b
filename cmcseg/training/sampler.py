"""The labeled/unlabeled two-stream batch sampler of semi-supervised training.

Every batch holds ``labeled_batch_size`` labeled indices followed by ``unlabeled_batch_size``
unlabeled ones (the layout of UA-MT's and CMC's ``TwoStreamBatchSampler``). The labeled
indices are reshuffled each pass, the unlabeled ones stream forever and are reshuffled
whenever they run out, so a small labeled set and a large unlabeled set mix at a fixed ratio.

Unlike the original sampler, a pass does not drop the labeled remainder: it has
``ceil(n_labeled / labeled_batch_size)`` batches, and the last batch is topped up from a
fresh shuffle of the labeled set. Every labeled index is therefore seen at least once per pass
(exactly once when ``labeled_batch_size`` divides ``n_labeled``), and a labeled set smaller
than one batch (``--labeled 0.05`` on a small dataset) still works.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["TwoStreamBatchSampler", "endless_batches"]


def _permutation_stream(indices: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
    """Indices in shuffled order, reshuffled every time they run out; never ends."""
    while True:
        yield from (int(i) for i in indices[rng.permutation(len(indices))])


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Batches of ``labeled_batch_size`` labeled then ``unlabeled_batch_size`` unlabeled indices.

    One iteration is one pass over the labeled indices (``len(self)`` batches). The unlabeled
    stream carries on across passes. The order is a deterministic function of ``seed`` and the
    number of passes drawn so far; labeled and unlabeled orders use independent generators so
    that one does not change when the other set changes.
    """

    def __init__(self, labeled_indices: Sequence[int], unlabeled_indices: Sequence[int], labeled_batch_size: int,
                 unlabeled_batch_size: int, seed: int = 0) -> None:
        if labeled_batch_size < 1:
            raise ValueError(f"labeled_batch_size must be >= 1, got {labeled_batch_size}")
        if unlabeled_batch_size < 0:
            raise ValueError(f"unlabeled_batch_size must be >= 0, got {unlabeled_batch_size}")
        if len(labeled_indices) == 0:
            raise ValueError("TwoStreamBatchSampler needs at least one labeled index")
        if unlabeled_batch_size > 0 and len(unlabeled_indices) == 0:
            raise ValueError(f"unlabeled_batch_size={unlabeled_batch_size} but there are no unlabeled indices; "
                             "pass unlabeled_batch_size=0 for supervised training")
        self.labeled_indices = np.asarray(labeled_indices, dtype=np.int64)
        self.unlabeled_indices = np.asarray(unlabeled_indices, dtype=np.int64)
        self.labeled_batch_size = int(labeled_batch_size)
        self.unlabeled_batch_size = int(unlabeled_batch_size)
        self.seed = int(seed)
        self._labeled_rng = np.random.default_rng([self.seed, 0])
        self._unlabeled_stream = _permutation_stream(self.unlabeled_indices, np.random.default_rng([self.seed, 1])) \
            if self.unlabeled_batch_size > 0 else None

    @property
    def batch_size(self) -> int:
        """Items per batch, labeled and unlabeled together."""
        return self.labeled_batch_size + self.unlabeled_batch_size

    def __len__(self) -> int:
        """Batches per pass over the labeled indices."""
        return math.ceil(len(self.labeled_indices) / self.labeled_batch_size)

    def _labeled_pass(self) -> np.ndarray:
        """One shuffle of the labeled indices, topped up from further shuffles to whole batches."""
        needed = len(self) * self.labeled_batch_size
        order = [self.labeled_indices[self._labeled_rng.permutation(len(self.labeled_indices))]]
        while sum(len(o) for o in order) < needed:
            order.append(self.labeled_indices[self._labeled_rng.permutation(len(self.labeled_indices))])
        return np.concatenate(order)[:needed]

    def __iter__(self) -> Iterator[list[int]]:
        labeled = self._labeled_pass()
        for b in range(len(self)):
            batch = [int(i) for i in labeled[b * self.labeled_batch_size:(b + 1) * self.labeled_batch_size]]
            if self._unlabeled_stream is not None:
                batch.extend(next(self._unlabeled_stream) for _ in range(self.unlabeled_batch_size))
            yield batch


def endless_batches(sampler: Sampler[list[int]]) -> Iterator[tuple[int, list[int]]]:
    """(batch number, indices) from pass after pass of ``sampler``, forever.

    The batch number lets a worker derive the batch's random seed, so a batch's content does
    not depend on which worker builds it.
    """
    number = 0
    while True:
        empty = True
        for batch in sampler:
            empty = False
            yield number, batch
            number += 1
        if empty:
            raise ValueError("the batch sampler yielded no batch in a whole pass")
