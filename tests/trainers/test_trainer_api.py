"""Every drafter trainer takes `(model, teacher_model, args)` and then `transformers.Trainer`'s keywords, the same
way; `compute_metrics` / `preprocess_logits_for_metrics`, `optimizers` and `callbacks` do what they do in Trainer."""

import inspect
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher
from transformers import Trainer, TrainerCallback

from trainers import (
    AdaSPECTrainer,
    DistillConfig,
    DistillTrainer,
    Eagle3Trainer,
    GuidedDrafterTrainer,
    SoFTConfig,
    SoFTTrainer,
)
from trainers.base import BaseDrafterTrainer

TRAINER_KEYWORDS = ("data_collator", "train_dataset", "eval_dataset", "processing_class", "compute_metrics",
                    "callbacks", "optimizers", "optimizer_cls_and_kwargs", "preprocess_logits_for_metrics")


@pytest.mark.parametrize("trainer_class", [DistillTrainer, AdaSPECTrainer, SoFTTrainer, GuidedDrafterTrainer,
                                           Eagle3Trainer])
def test_every_trainer_takes_model_teacher_args_then_trainers_keywords(trainer_class):
    own = inspect.signature(trainer_class.__init__).parameters
    assert list(own)[1:4] == ["model", "teacher_model", "args"]
    base = inspect.signature(BaseDrafterTrainer.__init__).parameters
    trainer = inspect.signature(Trainer.__init__).parameters
    for name in TRAINER_KEYWORDS:
        assert name in trainer and name in base and base[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert name in own or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())


def test_compute_metrics_sees_the_drafters_logits_reduced_by_preprocess(tokenizer, tmp_path):
    seen = {}

    def argmax(logits, labels):
        seen["logits_shape"] = tuple(logits.shape)
        return logits.argmax(-1)

    def next_token_accuracy(prediction):
        predictions, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
        trained = labels[:, 1:] != -100
        return {"next_token_accuracy": (predictions[:, :-1] == labels[:, 1:])[trained].float().mean().item()}

    trainer = DistillTrainer(
        tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), peaked_teacher(tokenizer),
        fast_args(DistillConfig, Path(tmp_path), lmbda=0.0), train_dataset=corpus_dataset(8),
        eval_dataset=corpus_dataset(8, seed=1), processing_class=tokenizer,
        compute_metrics=next_token_accuracy, preprocess_logits_for_metrics=argmax)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_next_token_accuracy"] <= 1.0 and "eval_loss" in metrics
    assert seen["logits_shape"][-1] == 32  # the drafter's vocabulary: its logits, reduced before gathering


def test_optimizers_and_callbacks_are_the_given_ones(tokenizer, tmp_path):
    model = tiny_llama(num_hidden_layers=3, seed=2, tokenizer=tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = SoFTTrainer(model, None, fast_args(SoFTConfig, Path(tmp_path), exits=[1, 3]),
                          train_dataset=corpus_dataset(8), processing_class=tokenizer,
                          optimizers=(optimizer, None), callbacks=[Count()])
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer or trainer.optimizer is optimizer
    assert steps == [1, 2] and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0


def test_misplaced_or_unsupported_arguments_are_clear_errors(tokenizer, tmp_path):
    args = fast_args(SoFTConfig, Path(tmp_path), exits=[1])
    with pytest.raises(TypeError, match="pass the config as `args=`"):
        SoFTTrainer(tiny_llama(num_hidden_layers=1, tokenizer=tokenizer), args)
    with pytest.raises(ValueError, match="`model_init` is not supported"):
        SoFTTrainer(tiny_llama(num_hidden_layers=1, tokenizer=tokenizer), args=args, model_init=lambda: None)
