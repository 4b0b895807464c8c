"""Distributed engines, run for real on 2 CPU processes (gloo) through `accelerate launch` and the shipped configs:
FSDP2 (recipes/configs/accelerate_fsdp2.yaml) and, where DeepSpeed is installed, ZeRO-3
(recipes/configs/accelerate_zero3.yaml). DistillTrainer (off- and on-policy), AdaSPECTrainer and SoFTTrainer (with
and without a teacher) train one SGD step with the student sharded and the teacher / reference sharded the way they
are on GPUs (never DDP-wrapped); the update — gathered, and as `save_model` writes it — equals the single-process one.

The single-process reference takes the same 8 rows. The split-invariant losses (distill, SoFT) are compared with
one micro-batch of 8; AdaSPEC (its token threshold is a per-micro-batch quantile) and on-policy distillation (the
drafter's greedy continuations depend on each generation batch's padding) with the same four micro-batches of 2
rows that the two processes see."""

import importlib.util

import pytest
from trainer_test_utils import (
    DEEPSPEED_CPU_SETTINGS,
    REPO_ROOT,
    build_sgd_trainer,
    flat_weights,
    launch_two_processes,
    run_one_sgd_step,
    save_peaked_teacher,
)

CONFIGS = REPO_ROOT / "recipes" / "configs"

# name -> (single-process batch size, accumulation) giving the same update as 2 processes x 2 rows x 2 steps
CASES = {
    "distill": (8, 1),
    "distill_on_policy": (2, 4),
    "adaspec": (2, 4),
    "soft": (8, 1),
    "soft_teacher": (8, 1),
}
ENGINES = {
    # accelerate 1.16 enables FSDP only on accelerator devices; dist_worker.allow_fsdp_on_cpu lifts that gate
    "fsdp2": dict(config="accelerate_fsdp2.yaml", settings=None, distributed_type="FSDP", wrapper="fsdp2"),
    "zero3": dict(config="accelerate_zero3.yaml", settings=DEEPSPEED_CPU_SETTINGS, distributed_type="DEEPSPEED",
                  wrapper="deepspeed"),
}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (see docs/training.md)")


@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_two_processes_give_the_single_process_update(tmp_path, engine):
    spec = ENGINES[engine]
    # The teacher is loaded from a path, as the recipes do (FSDP2: with the config's cpu_ram_efficient_loading on).
    teacher = save_peaked_teacher(tmp_path / "teacher")
    cases = {
        name: {"builder": "trainer_test_utils:build_sgd_trainer",
               "kwargs": {"name": name, "teacher": teacher, "save": True}}
        for name in CASES
    }
    results = launch_two_processes(tmp_path, cases, accelerate_config=CONFIGS / spec["config"],
                                   settings=spec["settings"])
    report = {}
    for name, (batch_size, accumulation) in CASES.items():
        facts = results[name]
        assert facts["world_size"] == 2 and facts["distributed_type"] == spec["distributed_type"], name
        assert facts["student"]["wrapper"] == spec["wrapper"] and facts["student"]["sharded"], name
        for role, frozen in facts["frozen"].items():
            # placed like on GPUs: sharded (FSDP2: one unit per decoder layer, + embeddings, norm/head, root), frozen
            assert frozen["wrapper"] == spec["wrapper"] and frozen["sharded"] and frozen["frozen"], (name, role)
            if engine == "fsdp2":
                assert frozen["layers"] > 0 and frozen["layers_sharded"] == frozen["layers"], (name, role, frozen)
        assert facts["saved_missing"] == [] and facts["saved_max_diff"] == 0.0, name  # one full checkpoint, rank 0
        _, single = run_one_sgd_step(name, tmp_path / f"single-{name}", batch_size, accumulation, teacher=teacher)
        start = flat_weights(build_sgd_trainer(name, tmp_path / f"start-{name}", 8, 1, teacher=teacher))
        assert (single - start).abs().max() > 1e-3, name  # the step moved the weights
        report[name] = (facts["weights"] - single).abs().max().item()
    print(f"{engine} (2 processes) vs 1 process, max |diff| of the updated weights:", report)
    assert all(diff <= 1e-6 for diff in report.values()), report
