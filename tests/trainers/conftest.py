"""Shared fixtures for the trainer tests: a character tokenizer, a tiny synthetic language and tiny Llamas."""

from __future__ import annotations

import pytest
import torch

from trainers.tiny import tiny_tokenizer


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny models are dominated by threading overhead: on a shared 2-core machine two intra-op threads made a
    # forward+backward ~100x slower than one. Restored afterwards so other tests keep their setting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
