"""The update of one optimizer step must not depend on how the batch is split: into gradient-accumulation
micro-batches (GA=1 vs GA=4) or over processes (1 vs 2, DDP with gloo on CPU)."""

import pytest
import torch
from trainer_test_utils import launch_two_processes, run_one_sgd_step


@pytest.mark.parametrize("name", ["distill", "soft"])
def test_gradient_accumulation_gives_the_full_batch_update(tmp_path, name):
    _, full = run_one_sgd_step(name, tmp_path / "full", batch_size=8, accumulation=1)
    _, accumulated = run_one_sgd_step(name, tmp_path / "ga", batch_size=2, accumulation=4)
    _, start = run_one_sgd_step(name, tmp_path / "zero", batch_size=8, accumulation=1, learning_rate=0.0)
    assert (full - start).abs().max() > 1e-3  # the step moved the weights
    assert torch.allclose(full, accumulated, atol=1e-6)


def test_two_processes_give_the_single_process_update(tmp_path):
    """DDP under torchrun: the student DDP-wrapped, the teacher placed on the device and never DDP-wrapped."""
    cases = {name: {"builder": "trainer_test_utils:build_sgd_trainer", "kwargs": {"name": name}}
             for name in ("distill", "soft")}
    results = launch_two_processes(tmp_path, cases)
    for name, facts in results.items():
        assert facts["world_size"] == 2 and facts["student"]["wrapper"] == "ddp", name
        assert all(f["wrapper"] == "none" and f["frozen"] for f in facts["frozen"].values()), name
        _, single = run_one_sgd_step(name, tmp_path / f"single-{name}", batch_size=8, accumulation=1)
        assert torch.allclose(facts["weights"], single, atol=1e-6), name
