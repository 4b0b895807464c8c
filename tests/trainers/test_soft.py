"""SoFTTrainer and its helpers: exits equal truncated models, the loss is the exits' mean, the checkpoint records
its exits, and bad exits are clear errors."""

import json

import pytest
import torch
from tiny import tiny_llama
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from trainers import SoFTConfig, SoFTTrainer, exit_logits, truncate_model
from trainers.losses import IGNORE_INDEX, forward_kl


def tiny_model(arch):
    torch.manual_seed(0)
    if arch == "llama":
        return tiny_llama(num_hidden_layers=4, vocab_size=50)
    if arch == "qwen2":
        config = Qwen2Config(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_window_layers=2,
        )
        return Qwen2ForCausalLM(config)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_last_hidden_state_is_already_normalised(arch):
    model = tiny_model(arch).eval()
    input_ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
        assert torch.allclose(model.get_output_embeddings()(outputs.hidden_states[-1]), outputs.logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_exit_logits_equal_a_truncated_model(arch):
    model = tiny_model(arch).eval()
    input_ids = torch.randint(3, 50, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding on one row
    with torch.no_grad():
        exits = exit_logits(model, input_ids, attention_mask)
        assert set(exits) == {1, 2, 3, 4}
        for layers, logits in exits.items():
            draft = truncate_model(model, layers)
            assert draft.config.num_hidden_layers == layers
            expected = draft(input_ids, attention_mask=attention_mask).logits
            assert torch.allclose(logits, expected, atol=1e-5), (arch, layers)
        assert torch.allclose(exits[4], model(input_ids, attention_mask=attention_mask).logits, atol=1e-5)


def test_truncate_model_copies_and_cuts_per_layer_settings():
    model = tiny_model("qwen2")
    draft = truncate_model(model, 2)
    assert draft.config.layer_types == model.config.layer_types[:2] and len(draft.model.layers) == 2
    with torch.no_grad():
        draft.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(draft.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="must be in 1..4"):
        truncate_model(model, 5)


def make_trainer(tokenizer, tmp_path, teacher=None, **config):
    config.setdefault("exits", [2, 3, 4])
    return SoFTTrainer(
        model=tiny_llama(num_hidden_layers=4, seed=5, tokenizer=tokenizer),
        teacher_model=teacher,
        args=fast_args(SoFTConfig, tmp_path, **config),
        train_dataset=corpus_dataset(16, columns=("text",)),
        processing_class=tokenizer,
    )


def test_loss_is_the_weighted_mean_of_the_exits_cross_entropies(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, exit_weights=[1.0, 0.0, 3.0])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    targets = batch["labels"][:, 1:][mask]
    with torch.no_grad():
        exits = exit_logits(trainer.model, batch["input_ids"], batch["attention_mask"])
        ce = {e: torch.nn.functional.cross_entropy(exits[e][:, :-1][mask], targets) for e in (2, 4)}
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(0.25 * ce[2].item() + 0.75 * ce[4].item(), rel=1e-5)


def test_training_lowers_every_exit_loss_and_records_exits_in_the_checkpoint(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, exit_thresholds=[0.5, 0.5, 0.0], learning_rate=1e-2, max_steps=12, logging_steps=1
    )
    trainer.train()
    first, last = trainer.state.log_history[0], trainer.state.log_history[-2]
    for exit_layer in (2, 3, 4):
        assert last[f"exit_{exit_layer}/ce"] < first[f"exit_{exit_layer}/ce"]
    trainer.save_model()
    out = tmp_path / "out"
    config = AutoConfig.from_pretrained(out)
    assert config.sorted_exits == [2, 3, 4] and config.sorted_exit_thresholds == [0.5, 0.5, 0.0]
    assert "sorted-draft" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["sorted_exits"] == [2, 3, 4]


def test_exits_can_distil_from_a_teacher(tokenizer, tmp_path):
    teacher = peaked_teacher(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, teacher=teacher, divergence="forward_kl")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        exits = exit_logits(trainer.model, batch["input_ids"], batch["attention_mask"])
        target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        expected = sum(forward_kl(exits[e][:, :-1][mask], target).mean() for e in (2, 3, 4)) / 3
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.train()
    assert "exit_2/expected_acceptance" in trainer.state.log_history[0]


@pytest.mark.parametrize(
    "exits, message",
    [([2, 5], "out of range"), ([2, 3], "last exit must be the model's full depth"), ([0, 4], "positive layer counts")],
)
def test_exits_that_do_not_fit_the_model_are_clear_errors(tokenizer, tmp_path, exits, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tokenizer, tmp_path, exits=exits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"exits": None}, "needs `exits`"),
        ({"exits": [3, 2]}, "strictly increasing"),
        ({"exits": [2, 4], "exit_weights": [1.0]}, "one non-negative weight per exit"),
        ({"exits": [2, 4], "exit_thresholds": [0.5, 1.5]}, "one probability in"),
    ],
)
def test_bad_soft_config_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SoFTConfig(output_dir="o", **overrides)


def test_soft_needs_a_config(tokenizer):
    with pytest.raises(ValueError, match="SoFTConfig"):
        SoFTTrainer(model=tiny_llama(tokenizer=tokenizer))
