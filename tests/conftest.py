"""Shared pytest setup: the repo root is importable, and the shared corpus is located once."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("CRAB_CORPUS", REPO.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The real-world corpus (../shared/corpus or $CRAB_CORPUS). Its absence is an error, not a skip."""
    if not CORPUS.is_dir():
        raise RuntimeError(f"The shared corpus is absent at {CORPUS}: set CRAB_CORPUS to its folder.")
    return CORPUS
