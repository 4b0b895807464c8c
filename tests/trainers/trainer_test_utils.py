"""Helpers shared by the trainer tests (imported by name: the test folders are not packages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset

# recipes/tiny.py is a recipe helper, not part of the package; torchrun workers import this file without conftest.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from tiny import tiny_corpus, tiny_llama

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def corpus_dataset(num_rows: int, seed: int = 0, columns=("prompt", "completion")) -> Dataset:
    return Dataset.from_list(tiny_corpus(num_rows, seed=seed)).select_columns(list(columns))


def peaked_teacher(tokenizer, seed: int = 1, num_hidden_layers: int = 2, vocab_size: int = 32, scale: float = 8.0):
    """A random teacher whose LM head is scaled up, so its distributions are far from uniform (a random student's
    expected acceptance against it starts low)."""
    teacher = tiny_llama(num_hidden_layers=num_hidden_layers, seed=seed, tokenizer=tokenizer, vocab_size=vocab_size)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(scale)
    return teacher


def save_peaked_teacher(folder) -> str:
    """`peaked_teacher` saved as a checkpoint (weights and config only), for trainers that load it from a path."""
    from tiny import tiny_tokenizer

    peaked_teacher(tiny_tokenizer()).save_pretrained(folder)
    return str(folder)


def fast_args(config_class, tmp_path, **overrides):
    """A config for a few CPU steps: no saving, no reporting, deterministic."""
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    settings.update(overrides)
    return config_class(**settings)


def sgd_args(config_class, tmp_path, **overrides):
    """One plain SGD step with lr 1 and no clipping: the parameter update *is* minus the gradient."""
    settings = {
        "optim": "sgd",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "weight_decay": 0.0,
        "max_steps": 1,
    }
    return fast_args(config_class, tmp_path, **{**settings, **overrides})


def build_sgd_trainer(name: str, tmp_path, batch_size: int, accumulation: int, teacher: str | None = None,
                      **overrides):
    """A trainer for one SGD step (lr 1) on the same 8 rows with uneven numbers of trained tokens:
    "distill" (DistillTrainer, TVD, off-policy), "distill_on_policy" (lmbda=1, greedy generation by the drafter),
    "adaspec" (AdaSPECTrainer, k=0.5, a 1-layer reference), "soft" (SoFTTrainer, cross-entropy on exits 1, 2, 3) or
    "soft_teacher" (SoFTTrainer distilling every exit from a teacher, TVD). `teacher`: a path to load the teacher
    from (`save_peaked_teacher`) instead of building it here."""
    from tiny import tiny_tokenizer

    from trainers import AdaSPECConfig, AdaSPECTrainer, DistillConfig, DistillTrainer, SoFTConfig, SoFTTrainer

    tmp_path = Path(tmp_path)
    tokenizer = tiny_tokenizer()
    dataset = corpus_dataset(8, seed=7)
    settings = dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **overrides)
    common = dict(train_dataset=dataset, processing_class=tokenizer)
    teacher = teacher or (peaked_teacher(tokenizer) if name != "soft" else None)
    if name in ("distill", "distill_on_policy"):
        if name == "distill_on_policy":
            settings.update(lmbda=1.0, max_new_tokens=6, generation_kwargs={"do_sample": False})
        return DistillTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
            teacher_model=teacher,
            args=sgd_args(DistillConfig, tmp_path, **{"divergence": "tvd", "lmbda": 0.0, **settings}),
            **common,
        )
    if name == "adaspec":
        return AdaSPECTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
            teacher_model=teacher,
            ref_model=tiny_llama(num_hidden_layers=1, seed=5, tokenizer=tokenizer),
            args=sgd_args(AdaSPECConfig, tmp_path, k=0.5, **settings),
            **common,
        )
    if name in ("soft", "soft_teacher"):
        teacher = teacher if name == "soft_teacher" else None
        extra = {"divergence": "tvd"} if teacher is not None else {}
        return SoFTTrainer(
            model=tiny_llama(num_hidden_layers=3, seed=4, tokenizer=tokenizer),
            teacher_model=teacher,
            args=sgd_args(SoFTConfig, tmp_path, exits=[1, 2, 3], **extra, **settings),
            **common,
        )
    raise ValueError(f"unknown trainer {name!r}")


def flat_weights(trainer) -> torch.Tensor:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_one_sgd_step(name: str, tmp_path, batch_size: int, accumulation: int, **overrides):
    """Train `build_sgd_trainer(...)` for its one step; returns the trainer and its flattened parameters after it."""
    trainer = build_sgd_trainer(name, tmp_path, batch_size, accumulation, **overrides)
    trainer.train()
    return trainer, flat_weights(trainer)


def worker_env() -> dict[str, str]:
    """The environment of a worker process: one thread, and the checkout's packages, tests and recipes importable
    (the packages may also be installed, editable, from another checkout)."""
    path = [str(REPO_ROOT), str(HERE), str(REPO_ROOT / "recipes")]
    inherited = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path + ([inherited] if inherited else [])))


# What the worker's trainers add to their config: CPU processes talking over gloo. Under DeepSpeed `use_cpu` must stay
# off (accelerate 1.16 then drops DeepSpeed for plain CPU processes) and gloo is named explicitly (with no accelerator
# accelerate finds no backend and would count one process).
CPU_SETTINGS = {"ddp_backend": "gloo", "use_cpu": True}
DEEPSPEED_CPU_SETTINGS = {"ddp_backend": "gloo"}


def launch_two_processes(tmp_path, cases: dict[str, dict], accelerate_config: str | Path | None = None,
                         settings: dict | None = None, timeout: int = 300) -> dict[str, dict]:
    """Run `dist_worker.py` on two CPU processes — under `torchrun` (DDP), or `accelerate launch --config_file
    accelerate_config` — to train each case one SGD step (2 rows per process, 2 accumulation steps: 8 rows).

    `cases`: `{name: {"builder": "module:function", "kwargs": {...}}}` (see dist_worker.py); `settings`: config
    fields every trainer gets (default `CPU_SETTINGS`). Returns rank 0's `{name: facts}`, each with the gathered
    updated weights of the student under `"weights"`."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "plan.json").write_text(json.dumps({"_settings": settings or CPU_SETTINGS, **cases}))
    worker = [str(HERE / "dist_worker.py"), str(tmp_path)]
    if accelerate_config is None:
        # --standalone lets the rendezvous bind a free port itself (no pick-then-bind race with other jobs).
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
    else:
        # Not `--cpu`: with it accelerate ignores FSDP / DeepSpeed and starts a single process; the trainers get
        # their CPU / gloo settings from the plan instead. Port 0: accelerate picks a free one.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                   "--num_processes", "2", "--main_process_port", "0", "--num_cpu_threads_per_process", "1",
                   *worker]
    result = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=timeout,
                            check=False)
    first_error = result.stderr.find("Traceback")  # a worker's own traceback, before the launcher's summary
    assert result.returncode == 0, result.stderr[max(first_error, 0):][:5000] + "\n...\n" + result.stderr[-1500:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    for name in facts:
        facts[name]["weights"] = torch.load(tmp_path / f"{name}.pt")
    return facts
