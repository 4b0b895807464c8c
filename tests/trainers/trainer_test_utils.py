"""Helpers shared by the trainer tests (imported by name: the test folders are not packages)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset

# recipes/tiny.py is a recipe helper, not part of the package; torchrun workers import this file without conftest.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from tiny import tiny_corpus, tiny_llama


def corpus_dataset(num_rows: int, seed: int = 0, columns=("prompt", "completion")) -> Dataset:
    return Dataset.from_list(tiny_corpus(num_rows, seed=seed)).select_columns(list(columns))


def peaked_teacher(tokenizer, seed: int = 1, num_hidden_layers: int = 2, vocab_size: int = 32, scale: float = 8.0):
    """A random teacher whose LM head is scaled up, so its distributions are far from uniform (a random student's
    expected acceptance against it starts low)."""
    teacher = tiny_llama(num_hidden_layers=num_hidden_layers, seed=seed, tokenizer=tokenizer, vocab_size=vocab_size)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(scale)
    return teacher


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


def build_sgd_trainer(name: str, tmp_path, batch_size: int, accumulation: int, **overrides):
    """A trainer for one SGD step (lr 1): DistillTrainer ("distill", TVD) or SoFTTrainer ("soft"), on the same 8 rows
    with uneven numbers of trained tokens."""
    from pathlib import Path

    from tiny import tiny_tokenizer

    from trainers import DistillConfig, DistillTrainer, SoFTConfig, SoFTTrainer

    tmp_path = Path(tmp_path)
    tokenizer = tiny_tokenizer()
    dataset = corpus_dataset(8, seed=7)
    settings = dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **overrides)
    if name == "distill":
        return DistillTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
            teacher_model=peaked_teacher(tokenizer),
            args=sgd_args(DistillConfig, tmp_path, divergence="tvd", lmbda=0.0, **settings),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    return SoFTTrainer(
        model=tiny_llama(num_hidden_layers=3, seed=4, tokenizer=tokenizer),
        args=sgd_args(SoFTConfig, tmp_path, exits=[1, 2, 3], **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def flat_weights(trainer) -> torch.Tensor:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_one_sgd_step(name: str, tmp_path, batch_size: int, accumulation: int, **overrides):
    """Train `build_sgd_trainer(...)` for its one step; returns the trainer and its flattened parameters after it."""
    trainer = build_sgd_trainer(name, tmp_path, batch_size, accumulation, **overrides)
    trainer.train()
    return trainer, flat_weights(trainer)
