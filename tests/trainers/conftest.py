"""Shared fixtures for the trainer tests: a character tokenizer, a tiny synthetic language and tiny Llamas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# recipes/tiny.py (the offline tokenizer, language and models) is a recipe helper, not part of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from tiny import tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(single_thread):  # tests/conftest.py's fixture, for every trainer test
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
