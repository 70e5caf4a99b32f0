"""Shared fixtures.  The default suite builds its own data; tests that read ../shared/datasets skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("REDREC_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of a public dataset in ../shared/datasets, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not (path / "events.csv.gz").exists():
        pytest.skip(f"public dataset {name!r} not found at {path} (set REDREC_SHARED_DATASETS to its parent folder)")
    return path


def no_temp_leftovers(parent: Path) -> list[str]:
    """Names of temporary/partial outputs an import may have left in ``parent`` (should be empty)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or "spill" in p.name or ".old-" in p.name))
