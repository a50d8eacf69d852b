"""Shared data fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from detrkit.data.synth import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (train/ and val/), generated once per test session. Treat as read-only."""
    return generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=8, image_size=96, seed=0)
