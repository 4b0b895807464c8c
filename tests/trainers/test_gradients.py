"""The update of one optimizer step must not depend on how the batch is split: into gradient-accumulation
micro-batches (GA=1 vs GA=4) or over processes (1 vs 2, DDP with gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_test_utils import run_one_sgd_step

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


@pytest.mark.parametrize("name", ["distill", "soft"])
def test_gradient_accumulation_gives_the_full_batch_update(tmp_path, name):
    _, full = run_one_sgd_step(name, tmp_path / "full", batch_size=8, accumulation=1)
    _, accumulated = run_one_sgd_step(name, tmp_path / "ga", batch_size=2, accumulation=4)
    _, start = run_one_sgd_step(name, tmp_path / "zero", batch_size=8, accumulation=1, learning_rate=0.0)
    assert (full - start).abs().max() > 1e-3  # the step moved the weights
    assert torch.allclose(full, accumulated, atol=1e-6)


def test_two_processes_give_the_single_process_update(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(HERE),
                                                                           str(REPO_ROOT / "recipes")]))
    command = [
        # --standalone lets the rendezvous bind a free port itself (no pick-then-bind race with other jobs).
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    for name in ("distill", "soft"):
        assert facts[name]["world_size"] == 2 and facts[name]["student_is_ddp"]
        assert not facts[name]["teacher_is_ddp"] and facts[name]["teacher_frozen"]  # placed, never DDP-wrapped
        _, single = run_one_sgd_step(name, tmp_path / f"single-{name}", batch_size=8, accumulation=1)
        assert torch.allclose(torch.load(tmp_path / f"{name}.pt"), single, atol=1e-6), name
