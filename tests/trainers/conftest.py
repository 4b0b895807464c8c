"""Shared fixtures for the trainer tests: a character tokenizer, a tiny synthetic language and tiny Llamas."""

from __future__ import annotations

import pytest

from trainers.tiny import tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(single_thread):  # tests/conftest.py's fixture, for every trainer test
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
