"""Shared pytest fixtures (helpers live in tests/helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_tiny_dataset


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "Dataset900_Tiny", unlabeled=("case02",))
