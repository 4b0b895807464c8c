"""GuidedDrafterTrainer (SD²): staleness positions, the guide the drafter is steered by, train modes, saving, the
update's independence from accumulation and processes, and configuration errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from trainer_test_utils import (
    corpus_dataset,
    fast_args,
    flat_weights,
    launch_two_processes,
    peaked_teacher,
    sgd_args,
)

from hf_specdec.guided import GuidedDrafter
from trainers import GuidedDrafterConfig, GuidedDrafterTrainer
from trainers.guided import guide_source_positions

HERE = Path(__file__).resolve().parent
VERIFIER_LAYERS = [1, 2]


def build_trainer(tmp_path, args_factory=fast_args, rows=8, **overrides):
    tokenizer = tiny_tokenizer()
    settings = {"verifier_layers": VERIFIER_LAYERS, "draft_length": 4, **overrides}
    return GuidedDrafterTrainer(
        model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
        teacher_model=peaked_teacher(tokenizer),
        args=args_factory(GuidedDrafterConfig, Path(tmp_path), **settings),
        train_dataset=corpus_dataset(rows, seed=7),
        processing_class=tokenizer,
    )


def build_sgd(tmp_path, batch_size, accumulation, **overrides):
    """The trainer of one SGD step (lr 1), untrained; also the builder the two-process test's worker calls."""
    return build_trainer(
        tmp_path,
        sgd_args,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        **overrides,
    )


def one_sgd_step(tmp_path, batch_size, accumulation, **overrides):
    trainer = build_sgd(tmp_path, batch_size, accumulation, **overrides)
    trainer.train()
    return trainer, flat_weights(trainer)


# ----- which target position steers which drafter position -------------------------------------------------------


def test_offset_staleness_reads_the_state_o_positions_back():
    assert guide_source_positions(8, 4, "offset", 3).tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert guide_source_positions(5, 4, "offset", 1).tolist() == [0, 0, 1, 2, 3]


def test_blocked_staleness_reads_the_state_just_before_each_block():
    # blocks of 4 starting at the phase: positions 1-4 read 0, 5-8 read 4, 9 reads 8
    assert guide_source_positions(10, 4, "blocked", 0).tolist() == [0, 0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert guide_source_positions(9, 4, "blocked", 2).tolist() == [0, 0, 0, 2, 2, 2, 2, 6, 6]
    offsets = torch.arange(1, 40) - guide_source_positions(40, 5, "blocked", 3)[1:]
    assert offsets.min() >= 1 and offsets[5:].max() == 5  # every drafted position sees a state 1..5 old


@pytest.mark.parametrize("staleness", ["offset", "blocked"])
def test_the_drafter_is_steered_by_the_target_states_at_the_source_positions(tmp_path, staleness):
    trainer = build_trainer(tmp_path, staleness=staleness)
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch)
    handle.remove()
    draw = trainer.staleness_draw()  # the same draw: it depends on (seed, step) only
    source = guide_source_positions(batch["input_ids"].shape[1], 4, staleness, draw)
    with torch.no_grad():
        hidden = trainer.teacher_model(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
        ).hidden_states
    expected = torch.stack([hidden[i] for i in VERIFIER_LAYERS], dim=-2)[:, source]
    assert torch.equal(seen["guide_states"], expected)
    labels = batch["labels"]
    assert torch.equal(seen["guide_mask"][:, :-1], labels[:, 1:] != -100)  # steered iff its prediction is trained
    assert not seen["guide_mask"][:, -1].any()


# ----- training modes and saving -----------------------------------------------------------------------------------


def test_full_training_moves_guide_and_drafter_and_saves_a_guided_drafter(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=3, learning_rate=1e-2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    drafter_before = model.drafter.model.layers[0].mlp.up_proj.weight.clone()
    trainer.train()
    assert model.guide.projection.weight.abs().sum() > 0  # zero-initialised, now trained
    assert not torch.equal(model.drafter.model.layers[0].mlp.up_proj.weight, drafter_before)
    logged = [entry for entry in trainer.state.log_history if "expected_acceptance" in entry]
    assert logged and 0 <= logged[-1]["expected_acceptance"] <= 1 and 1 <= logged[-1]["guide_staleness"] <= 4
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    loaded = GuidedDrafter.from_pretrained(out)
    assert loaded.config.draft_length == 4 and loaded.config.verifier_layers == VERIFIER_LAYERS
    assert "SD2" in (out / "README.md").read_text() or "2511.09844" in (out / "README.md").read_text()
    ids, states = torch.tensor([[1, 5, 6, 7]]), torch.randn(1, 2, 32)
    torch.testing.assert_close(loaded(ids, guide_states=states).logits, model(ids, guide_states=states).logits)


def test_frozen_drafter_trains_only_the_guide(tmp_path):
    trainer = build_trainer(tmp_path, train_drafter="frozen", max_steps=2, learning_rate=1e-2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    drafter_before = [p.clone() for p in model.drafter.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(drafter_before, model.drafter.parameters()))
    assert model.guide.projection.weight.abs().sum() > 0


def test_lora_trains_adapters_and_saves_a_merged_guided_drafter(tmp_path):
    trainer = build_trainer(tmp_path, train_drafter="lora", lora_r=4, max_steps=2, learning_rate=1e-2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, GuidedDrafter)
    up = model.drafter.model.layers[0].mlp.up_proj
    base_before = up.base_layer.weight.clone()
    trainer.train()
    assert torch.equal(up.base_layer.weight, base_before) and up.lora_B["default"].weight.abs().sum() > 0
    assert model.guide.projection.weight.abs().sum() > 0
    trainer.save_model()
    loaded = GuidedDrafter.from_pretrained(trainer.args.output_dir)
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    ids, states = torch.tensor([[1, 5, 6, 7, 9]]), torch.randn(1, 2, 32)
    torch.testing.assert_close(
        loaded(ids, guide_states=states).logits, model(ids, guide_states=states).logits, atol=1e-5, rtol=1e-4
    )


def test_a_guided_drafter_can_be_passed_and_its_layers_are_kept(tmp_path):
    tokenizer = tiny_tokenizer()
    teacher = peaked_teacher(tokenizer)
    guided = GuidedDrafter.from_drafter(
        tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
        teacher.config,
        verifier_layers=[0, 2],
        guide_method="simple",
    )
    trainer = GuidedDrafterTrainer(
        model=guided,
        teacher_model=teacher,
        args=fast_args(GuidedDrafterConfig, tmp_path),
        train_dataset=corpus_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.accelerator.unwrap_model(trainer.model).config.verifier_layers == [0, 2]


# ----- normalisation --------------------------------------------------------------------------------------------


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path):
    _, full = one_sgd_step(tmp_path / "full", batch_size=8, accumulation=1)
    _, accumulated = one_sgd_step(tmp_path / "ga", batch_size=2, accumulation=4)
    _, start = one_sgd_step(tmp_path / "zero", batch_size=8, accumulation=1, learning_rate=0.0)
    assert (full - start).abs().max() > 1e-3
    assert torch.allclose(full, accumulated, atol=1e-6)


def test_two_processes_give_the_single_process_update(tmp_path):
    facts = launch_two_processes(tmp_path, {"guided": {"builder": f"{Path(__file__).stem}:build_sgd"}})["guided"]
    assert facts["world_size"] == 2
    assert facts["frozen"]["teacher_model"]["wrapper"] == "none" and facts["frozen"]["teacher_model"]["frozen"]
    _, single = one_sgd_step(tmp_path / "single", batch_size=8, accumulation=1)
    assert torch.allclose(facts["weights"], single, atol=1e-6)


# ----- recipes ------------------------------------------------------------------------------------------------

RECIPES = HERE.parents[1] / "recipes"
TINY_WORLD = ["--tiny_train_rows", "24", "--tiny_eval_rows", "8", "--tiny_target_steps", "3"]


def test_synthetic_dataset_is_written_with_datasets_and_resumes(tmp_path):
    sys.path.insert(0, str(RECIPES))
    from datasets import load_from_disk
    from make_synthetic_dataset import main

    argv = ["--tiny", "true", "--output_dir", str(tmp_path), *TINY_WORLD, "--max_new_tokens", "6", "--batch_size", "4"]
    main([*argv, "--num_prompts", "6"])
    main([*argv, "--num_prompts", "10"])  # resumes: answers only prompts 6..9
    rows = load_from_disk(str(tmp_path / "dataset"))["train"]
    assert rows["prompt_index"] == list(range(10))
    for row in rows:
        prompt_length = row["prompt_length"]
        assert row["loss_mask"] == [0] * prompt_length + [1] * (len(row["input_ids"]) - prompt_length)
        assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:]
        assert set(row["labels"][:prompt_length]) == {-100}


def test_guided_recipe_runs_offline_and_benchmarks_three_drafters(tmp_path):
    sys.path.insert(0, str(RECIPES))
    from guided import main

    main(
        [
            "--config",
            str(RECIPES / "configs" / "guided.yaml"),
            "--output_dir",
            str(tmp_path),
            *TINY_WORLD,
            "--draft_pretrain_steps",
            "2",
            "--num_train_prompts",
            "16",
            "--num_eval_prompts",
            "4",
            "--bench_prompts",
            "4",
            "--synthetic_new_tokens",
            "8",
            "--bench_new_tokens",
            "8",
            "--bench_seeds",
            "1",
            "--max_steps",
            "2",
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    plain = results.pop("plain generate (no drafter)")  # the speed-up baseline: wall times only
    assert plain["greedy_seconds"] > 0 and plain["sampling_seconds"] > 0
    assert len(results) == 3
    for row in results.values():
        assert 1.0 <= row["greedy_tau"] <= 5.0 and 0.0 <= row["sampling_alpha"] <= 1.0
        assert 0.0 <= row["heldout_expected_acceptance"] <= 1.0
        assert row["greedy_speedup"] > 0 and row["sampling_speedup"] > 0


# ----- errors ---------------------------------------------------------------------------------------------------


def test_configuration_errors(tmp_path):
    for bad in (
        {"train_drafter": "half"},
        {"staleness": "fresh"},
        {"draft_length": 0},
        {"drafter_layers": "x,y"},
        {"guide_method": "elmnt_wise"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fast_args(GuidedDrafterConfig, tmp_path, **bad)
    assert fast_args(GuidedDrafterConfig, tmp_path, drafter_layers="0, 2").drafter_layers == [0, 2]
    with pytest.raises(ValueError, match="set `verifier_layers`"):
        build_trainer(tmp_path, verifier_layers=None)
    with pytest.raises(ValueError, match="hidden_states indices 0..2"):
        build_trainer(tmp_path, verifier_layers=[1, 5])
    from peft import LoraConfig

    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="train_drafter"):
        GuidedDrafterTrainer(
            model=tiny_llama(num_hidden_layers=1, tokenizer=tokenizer),
            teacher_model=peaked_teacher(tokenizer),
            args=fast_args(GuidedDrafterConfig, tmp_path, verifier_layers=[1]),
            train_dataset=corpus_dataset(8),
            processing_class=tokenizer,
            peft_config=LoraConfig(),
        )



def test_the_callers_config_is_not_changed(tmp_path):
    """GuidedDrafterTrainer used to set the caller's `model_init_kwargs` to None (consumed): a config reused for a
    second trainer then loaded the model without them."""
    tokenizer = tiny_tokenizer()
    tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer).save_pretrained(tmp_path / "drafter")
    args = fast_args(GuidedDrafterConfig, tmp_path, verifier_layers=VERIFIER_LAYERS,
                     model_init_kwargs={"dtype": "float32"})
    GuidedDrafterTrainer(model=str(tmp_path / "drafter"),
                         teacher_model=peaked_teacher(tokenizer), args=args, train_dataset=corpus_dataset(8),
                         processing_class=tokenizer)
    assert args.model_init_kwargs == {"dtype": "float32"}
