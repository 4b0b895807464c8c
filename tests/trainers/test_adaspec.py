"""AdaSPECTrainer: the ΔL filter selects exactly the top-k tokens, the loss uses them, the window option makes the
selection independent of gradient accumulation, and bad input is a clear error."""

import functools

import pytest
import torch
from tiny import tiny_llama
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher, sgd_args

from trainers import AdaSPECConfig, AdaSPECTrainer
from trainers.adaspec import select_top_fraction
from trainers.losses import IGNORE_INDEX, forward_kl


def make_trainer(tokenizer, args, train_rows=16, ref_model="default"):
    return AdaSPECTrainer(
        model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
        teacher_model=peaked_teacher(tokenizer),
        ref_model=tiny_llama(num_hidden_layers=1, seed=3, tokenizer=tokenizer) if ref_model == "default" else ref_model,
        args=args,
        train_dataset=corpus_dataset(train_rows),
        processing_class=tokenizer,
    )


def test_select_top_fraction_keeps_exactly_the_largest():
    delta = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.7, -0.2, 1.5, 0.0, 0.9, -0.5])
    selected = select_top_fraction(delta, 0.4)
    assert set(torch.nonzero(selected).flatten().tolist()) == {2, 4, 6, 8}  # 2.0, 1.5, 0.9, 0.7
    assert select_top_fraction(delta, 1.0).all()
    assert select_top_fraction(delta, 0.1).sum() == 1 and select_top_fraction(delta, 0.1)[2]
    assert select_top_fraction(torch.tensor([]), 0.4).numel() == 0


def test_trainer_selects_the_tokens_with_the_largest_delta_and_trains_only_them(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, fast_args(AdaSPECConfig, tmp_path, k=0.4))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        draft, target, ref = (
            m(**ids).logits[:, :-1][mask] for m in (trainer.model, trainer.teacher_model, trainer.ref_model)
        )
        draft_kl = forward_kl(draft, target)
        delta = draft_kl - forward_kl(ref, target)
        expected = delta >= torch.quantile(delta, 0.6)
        frozen = trainer.frozen_models(batch, mask)
        values = trainer.student_token_values(trainer.model, batch, mask, functools.partial(
            trainer.token_values, frozen=frozen, targets=batch["labels"][:, 1:][mask], use_ce=False))
        torch.testing.assert_close(values["delta_loss"], delta, rtol=1e-4, atol=1e-5)  # chunked == whole logits
        selected = trainer.select_tokens(batch, mask, values)
        loss = trainer.compute_loss(trainer.model, batch)
    assert torch.equal(selected, expected)
    assert int(selected.sum()) == pytest.approx(0.4 * len(delta), abs=1)
    # The paper's normaliser: the selected tokens' KL over *all* trained tokens.
    assert loss.item() == pytest.approx(draft_kl[expected].sum().item() / len(delta), rel=1e-5)


def test_selected_token_normalisation_divides_by_the_selected_count(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, fast_args(AdaSPECConfig, tmp_path, k=0.5, loss_normalization="selected_tokens"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    selected = batches[0]["adaspec_selected"]
    assert num_items == int(selected.sum())
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert not (selected & ~mask).any()  # only trained tokens can be selected


def final_weights(tokenizer, tmp_path, batch_size, accumulation, **config):
    trainer = make_trainer(
        tokenizer,
        sgd_args(
            AdaSPECConfig,
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            **config,
        ),
        train_rows=8,
    )
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("normalization", ["all_tokens", "selected_tokens"])
def test_window_threshold_makes_the_update_independent_of_accumulation(tokenizer, tmp_path, normalization):
    config = {"k": 0.4, "threshold_scope": "accumulation_window", "loss_normalization": normalization}
    whole = final_weights(tokenizer, tmp_path, 8, 1, **config)
    accumulated = final_weights(tokenizer, tmp_path, 2, 4, **config)
    assert torch.allclose(whole, accumulated, atol=1e-6)


def test_selection_metrics_are_logged(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, fast_args(AdaSPECConfig, tmp_path, k=0.4, max_steps=2))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["selected_fraction"] == pytest.approx(0.4, abs=0.05)
    assert "mean_delta_loss" in logged
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2510.19779" in card and "token fraction k | 0.4" in card


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_k_outside_the_unit_interval_is_a_clear_error(k):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        AdaSPECConfig(output_dir="o", k=k)


def test_bad_scope_is_a_clear_error():
    with pytest.raises(ValueError, match="threshold_scope"):
        AdaSPECConfig(output_dir="o", threshold_scope="global")


def test_missing_reference_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs `ref_model`"):
        make_trainer(tokenizer, fast_args(AdaSPECConfig, tmp_path), ref_model=None)


def test_reference_loads_from_a_path_with_init_kwargs(tokenizer, tmp_path):
    ref_dir = tmp_path / "ref"
    tiny_llama(num_hidden_layers=1, seed=3, tokenizer=tokenizer).save_pretrained(ref_dir)
    trainer = make_trainer(
        tokenizer,
        fast_args(AdaSPECConfig, tmp_path, ref_model_init_kwargs={"dtype": "float64"}),
        ref_model=str(ref_dir),
    )
    assert trainer.ref_model.dtype == torch.float64 and not trainer.ref_model.training
    trainer.train()
