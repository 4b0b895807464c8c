"""Chunked losses and offline teachers for every trainer.

The loss projects hidden states to logits a chunk of tokens at a time (backward recomputes each chunk); its value and
gradients must equal the unchunked loss's (`loss_chunk_size=0`: whole logits) for every trainer and divergence.
An offline teacher dataset (`trainers.offline`) replaces the live teacher in every trainer; when it keeps every token
(k = V) the loss is the dense divergence of the stored distribution, gradients included."""

from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher

from trainers import (
    AdaSPECConfig,
    AdaSPECTrainer,
    DistillConfig,
    DistillTrainer,
    GuidedDrafterConfig,
    GuidedDrafterTrainer,
    SoFTConfig,
    SoFTTrainer,
)
from trainers.data import tokenize_dataset
from trainers.losses import get_divergence
from trainers.offline import TeacherMetadata, precompute_teacher

CASES = {
    "distill-forward_kl": (DistillTrainer, DistillConfig, {"divergence": "forward_kl"}),
    "distill-reverse_kl": (DistillTrainer, DistillConfig, {"divergence": "reverse_kl"}),
    "distill-jsd": (DistillTrainer, DistillConfig, {"divergence": "jsd", "beta": 0.3}),
    "distill-tvd": (DistillTrainer, DistillConfig, {"divergence": "tvd"}),
    "distill-forward_kl+ce": (DistillTrainer, DistillConfig, {"ce_weight": 0.5, "temperature": 2.0}),
    "adaspec": (AdaSPECTrainer, AdaSPECConfig, {"k": 0.5}),
    "adaspec-window": (AdaSPECTrainer, AdaSPECConfig, {"k": 0.5, "threshold_scope": "accumulation_window"}),
    "soft-teacher": (SoFTTrainer, SoFTConfig, {"exits": [1, 2], "divergence": "tvd"}),
    "soft-labels": (SoFTTrainer, SoFTConfig, {"exits": [1, 2]}),
    "guided": (GuidedDrafterTrainer, GuidedDrafterConfig, {"verifier_layers": [1, 2], "draft_length": 3}),
}


def build(case: str, tmp_path, train_dataset=None, offline: bool = False, teacher_metadata=None, compute_metrics=None,
          **overrides):
    trainer_class, config_class, settings = CASES[case]
    tokenizer = tiny_tokenizer()
    kwargs = {"teacher_metadata": teacher_metadata} if teacher_metadata else {}
    if compute_metrics is not None:
        kwargs["compute_metrics"] = compute_metrics
    if (not offline and case != "soft-labels") or case == "guided":  # offline, guided reads the target's config
        kwargs["teacher_model"] = peaked_teacher(tokenizer)
    if trainer_class is AdaSPECTrainer:
        kwargs["ref_model"] = tiny_llama(num_hidden_layers=1, seed=5, tokenizer=tokenizer)
    layers = 2 if trainer_class is SoFTTrainer else 1
    args = fast_args(config_class, Path(tmp_path), lmbda=0.0, **{**settings, **overrides}) \
        if issubclass(config_class, DistillConfig) else fast_args(config_class, Path(tmp_path), **settings, **overrides)
    trainer = trainer_class(model=tiny_llama(num_hidden_layers=layers, seed=2, tokenizer=tokenizer), args=args,
                            train_dataset=train_dataset if train_dataset is not None else corpus_dataset(8, seed=7),
                            processing_class=tokenizer, **kwargs)
    trainer.model.train()
    return trainer


def first_window(trainer):
    """The first micro-batch, prepared as training prepares it (AdaSPEC's window pass included), and its count."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    return batches[0], num_items


def loss_and_grads(trainer, batch, num_items, chunk_size: int):
    trainer.args.loss_chunk_size = chunk_size
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(case, tmp_path):
    trainer = build(case, tmp_path)
    batch, num_items = first_window(trainer)
    loss, grads = loss_and_grads(trainer, batch, num_items, chunk_size=0)
    chunked_loss, chunked_grads = loss_and_grads(trainer, batch, num_items, chunk_size=7)  # many uneven chunks
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    assert chunked_grads.keys() == grads.keys() and len(grads) > 3
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_with_nothing_to_train_keeps_every_parameter_in_the_graph(tmp_path):
    """DDP expects a gradient for every parameter from every process, even one whose micro-batch trains nothing."""
    trainer = build("distill-forward_kl", tmp_path)
    batch, _ = first_window(trainer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    for chunk_size in (0, 7):
        trainer.args.loss_chunk_size = chunk_size
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(5))
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is not None and not p.grad.any() for p in trainer.model.parameters())


def test_a_model_whose_logits_are_not_its_head_on_its_last_state_is_trained_unchunked(tmp_path):
    """The chunked path projects the last hidden state with the LM head; a model that post-processes its logits
    another way is detected (once) and trained on its own logits, with a warning: never a silently different loss."""
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 3.0
            return outputs

    tokenizer = tiny_tokenizer()
    draft = tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)
    scaled = ScaledLogits(draft.config)
    scaled.load_state_dict(draft.state_dict())
    trainer = DistillTrainer(model=scaled, teacher_model=peaked_teacher(tokenizer),
                             args=fast_args(DistillConfig, tmp_path, lmbda=0.0, remove_unused_columns=False),
                             train_dataset=corpus_dataset(8), processing_class=tokenizer)
    batch, num_items = first_window(trainer)
    with pytest.warns(UserWarning, match="not its LM head"):
        chunked, _ = loss_and_grads(trainer, batch, num_items, chunk_size=7)
    unchunked, _ = loss_and_grads(trainer, batch, num_items, chunk_size=0)
    torch.testing.assert_close(chunked, unchunked)


# ----- offline teachers ---------------------------------------------------------------------------------------------


def offline_dataset(state_layers=None, top_k=32, temperature=1.0):
    tokenizer = tiny_tokenizer()
    rows = tokenize_dataset(corpus_dataset(8, seed=7), tokenizer, 512)
    return precompute_teacher(peaked_teacher(tokenizer), rows, top_k=top_k, temperature=temperature,
                              state_layers=state_layers, pad_token_id=tokenizer.pad_token_id, progress=False)


@pytest.mark.parametrize("case", ["distill-forward_kl", "distill-jsd", "adaspec", "soft-teacher", "guided"])
def test_every_trainer_trains_from_an_offline_teacher_exactly(case, tmp_path):
    """With every token kept (k = V), the loss on the stored teacher is the dense divergence of the stored
    distribution — checked by training the same student live against a teacher whose logits are those stored
    log-probabilities."""
    state_layers = [1, 2] if case == "guided" else None
    data = offline_dataset(state_layers)
    offline = build(case, tmp_path / "offline", train_dataset=data, offline=True)
    assert offline.teacher_model is None and offline.offline
    batch, num_items = first_window(offline)
    loss, grads = loss_and_grads(offline, batch, num_items, chunk_size=7)
    assert torch.isfinite(loss) and loss > 0 and grads

    # the stored distribution, densely: log-probabilities in id order (k = V keeps every id)
    stored = torch.full(batch["teacher_top_logprobs"].shape, 0.0).scatter(
        -1, batch["teacher_top_ids"], batch["teacher_top_logprobs"])
    positions, _ = offline.trained_targets(batch)
    divergence = get_divergence(offline.args.divergence, offline.args.beta)
    student = offline.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            **({"guide_states": offline.guide_states(batch, None)[:, guide_source(offline, batch)],
                                "guide_mask": torch.nn.functional.pad(positions, (0, 1))} if case == "guided" else {})
                            ).logits if case != "soft-teacher" else None
    if case == "soft-teacher":
        from trainers import exit_logits

        exits = exit_logits(offline.model, batch["input_ids"], batch["attention_mask"], [1, 2])
        expected = sum(0.5 * divergence(exits[e][:, :-1][positions], stored[:, :-1][positions], 1.0) for e in (1, 2))
    else:
        expected = divergence(student[:, :-1][positions], stored[:, :-1][positions], 1.0)
    if case == "adaspec":
        ref = offline.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        forward_kl = get_divergence("forward_kl")
        delta = (forward_kl(student[:, :-1][positions], stored[:, :-1][positions], 1.0)
                 - forward_kl(ref[:, :-1][positions], stored[:, :-1][positions], 1.0))
        expected = torch.where(delta >= torch.quantile(delta, 0.5), expected, 0.0)
    torch.testing.assert_close(loss, expected.sum() / num_items, rtol=1e-4, atol=1e-6)


def guide_source(trainer, batch):
    from trainers.guided import guide_source_positions

    return guide_source_positions(batch["input_ids"].shape[1], trainer.args.draft_length, trainer.args.staleness,
                                  trainer.staleness_draw())


def test_offline_teacher_errors_name_what_to_change(tmp_path):
    data = offline_dataset()
    with pytest.raises(ValueError, match="lmbda=0"):
        DistillTrainer(model=tiny_llama(num_hidden_layers=1, tokenizer=tiny_tokenizer()),
                       args=fast_args(DistillConfig, tmp_path, lmbda=0.5), train_dataset=data,
                       processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="drop it"):
        build("distill-forward_kl", tmp_path, train_dataset=data, offline=False)
    with pytest.raises(ValueError, match="Offline teacher datasets"):
        DistillTrainer(model=tiny_llama(num_hidden_layers=1, tokenizer=tiny_tokenizer()),
                       args=fast_args(DistillConfig, tmp_path, lmbda=0.0), train_dataset=data,
                       eval_dataset=corpus_dataset(4), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="stored at temperature 1.0"):
        build("distill-forward_kl", tmp_path, train_dataset=data, offline=True, temperature=2.0,
              teacher_metadata=TeacherMetadata(None, 32, 1.0, None, 32))
    with pytest.raises(ValueError, match="no target states"):
        guided = build("guided", tmp_path / "g", train_dataset=data, offline=True)
        loss_and_grads(guided, *first_window(guided), chunk_size=7)


def test_the_head_check_is_per_model_not_per_class(tmp_path):
    """Whether logits are the LM head on the last state can depend on the config (Granite's `logits_scaling`): a
    teacher of the same class that passes must not vouch for a student that does not."""
    from transformers import GraniteConfig, GraniteForCausalLM

    def granite(scaling, seed):
        torch.manual_seed(seed)
        return GraniteForCausalLM(GraniteConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                logits_scaling=scaling, pad_token_id=0))

    tokenizer = tiny_tokenizer()
    trainer = DistillTrainer(granite(4.0, 0), granite(1.0, 1), fast_args(DistillConfig, tmp_path, lmbda=0.0),
                             train_dataset=corpus_dataset(8), processing_class=tokenizer)
    batch, num_items = first_window(trainer)
    with pytest.warns(UserWarning, match="not its LM head"):  # the student; the teacher (scaling 1) passes
        chunked, chunked_grads = loss_and_grads(trainer, batch, num_items, chunk_size=7)
    unchunked, grads = loss_and_grads(trainer, batch, num_items, chunk_size=0)
    torch.testing.assert_close(chunked, unchunked)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_a_student_with_a_bigger_head_than_the_stored_teacher_is_cut_to_its_vocabulary(tmp_path, divergence):
    """A live teacher's loss compares the models on their shared vocabulary; so must a stored one (the student's
    padded rows past the teacher's vocabulary are not a tail)."""
    data = offline_dataset()
    tokenizer = tiny_tokenizer()
    student = tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer, vocab_size=40)
    args = fast_args(DistillConfig, tmp_path, lmbda=0.0, divergence=divergence)
    offline = DistillTrainer(student, args=args, train_dataset=data, processing_class=tokenizer,
                             teacher_metadata=TeacherMetadata(None, 32, 1.0, None, 32))
    batch, num_items = first_window(offline)
    loss, _ = loss_and_grads(offline, batch, num_items, chunk_size=7)
    live = DistillTrainer(student, peaked_teacher(tokenizer), args, train_dataset=corpus_dataset(8, seed=7),
                          processing_class=tokenizer)
    live_batch, _ = first_window(live)
    live_loss, _ = loss_and_grads(live, live_batch, num_items, chunk_size=7)
    torch.testing.assert_close(loss, live_loss, rtol=2e-2, atol=1e-3)  # the stored log-probabilities are bf16


def test_offline_teachers_stream_and_guided_checks_its_stored_layers(tmp_path):
    data = offline_dataset(state_layers=[0, 1])
    streamed = build("distill-forward_kl", tmp_path / "s", train_dataset=data.to_iterable_dataset(), offline=True)
    streamed.train()  # max_steps=2
    assert streamed.state.global_step == 2
    with pytest.raises(ValueError, match=r"stored: layers \[0, 1\]"):
        guided = build("guided", tmp_path / "g", train_dataset=data, offline=True,
                       teacher_metadata=TeacherMetadata(None, 32, 1.0, [0, 1], 32))
        loss_and_grads(guided, *first_window(guided), chunk_size=7)
    with pytest.raises(ValueError, match="does not support `compute_metrics`"):
        build("guided", tmp_path / "m", compute_metrics=lambda prediction: {})
