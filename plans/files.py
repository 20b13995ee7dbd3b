"""The names of the files that are the contracts between stages, defined once.

``preprocessed/NAME/`` holds ``fingerprint.json``, ``plans.json``, ``splits.json`` and a copy of
the raw ``dataset.json``; a model folder holds ``plans.json`` and ``dataset.json`` too.
"""
from __future__ import annotations

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
SPLITS_FILE = "splits.json"
DATASET_FILE = "dataset.json"
#: a fold's record of how it was trained (trainer, hyperparameters), beside its checkpoints
TRAINING_CONFIG_FILE = "training_config.json"

