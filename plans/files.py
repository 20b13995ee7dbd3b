"""The names of the files that are the contracts between stages, defined once.

``preprocessed/NAME/`` holds ``fingerprint.json``, ``plans.json``, ``splits.json`` and a copy of
the raw ``dataset.json`` (plus ``<identifier>.json`` for each planner variant); a model folder holds
its ``plans.json`` and ``dataset.json`` too.
"""
from __future__ import annotations

import re

from cmcseg.errors import CmcsegError

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
SPLITS_FILE = "splits.json"
DATASET_FILE = "dataset.json"
#: a fold's record of how it was trained (trainer, hyperparameters), beside its checkpoints
TRAINING_CONFIG_FILE = "training_config.json"
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
#: the plans identifier of the default planner (``cmcseg plan``); its plans are ``plans.json``
DEFAULT_PLANS = "cmcsegPlans"


def plans_file_name(identifier: str = DEFAULT_PLANS) -> str:
    """The plans file of a plans identifier in a preprocessed dataset: ``plans.json`` for the default planner,
    ``<identifier>.json`` for a variant (``cmcseg plan -pl``), so that variants sit side by side as in nnU-Net."""
    if not _IDENTIFIER.fullmatch(identifier):
        raise CmcsegError(f"plans identifier {identifier!r} is not a plain name (letters, digits, '_', '.', '+', '-'). "
                          f"Fix: pass one `cmcseg plan -pl` wrote, e.g. -p {DEFAULT_PLANS}.")
    return PLANS_FILE if identifier == DEFAULT_PLANS else f"{identifier}.json"

