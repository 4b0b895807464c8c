"""DistillTrainer: data formats, the loss it computes, on-policy regeneration and its normaliser, end-to-end
improvement on held-out data, hooks, saving (model card, PEFT), resuming, configs and clear errors."""

import json

import pytest
import torch
from datasets import Dataset
from tiny import tiny_llama
from tokenizers import Tokenizer, models
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher
from transformers import HfArgumentParser, PreTrainedTokenizerFast, TrainerCallback

from trainers import DistillConfig, DistillTrainer
from trainers.data import tokenize_row
from trainers.losses import IGNORE_INDEX, shared_vocab, total_variation


def make_trainer(tokenizer, tmp_path, train_rows=16, eval_rows=8, student=None, teacher=None, **config):
    student = student if student is not None else tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)
    teacher = teacher if teacher is not None else peaked_teacher(tokenizer)
    config.setdefault("lmbda", 0.0)
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=fast_args(DistillConfig, tmp_path, **config),
        train_dataset=corpus_dataset(train_rows),
        eval_dataset=corpus_dataset(eval_rows, seed=1) if eval_rows else None,
        processing_class=tokenizer,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ----- data formats ---------------------------------------------------------------------------------------------


def test_prompt_completion_rows_train_only_the_completion(tokenizer):
    row = tokenize_row({"prompt": "ab", "completion": " cd"}, "prompt+completion", tokenizer, max_length=64)
    prompt_ids = tokenizer("ab")["input_ids"]
    assert row["input_ids"] == prompt_ids + tokenizer(" cd", add_special_tokens=False)["input_ids"] + [2]
    assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert row["labels"][len(prompt_ids) :] == row["input_ids"][len(prompt_ids) :]


def test_chat_rows_train_the_assistant_message(tokenizer):
    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    row = tokenize_row({"messages": messages}, "messages", tokenizer, max_length=64)
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "cd</s>"


def test_multi_turn_chats_train_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "cd"}, {"role": "user", "content": "ef"},
                {"role": "assistant", "content": "gh"}]
    row = tokenize_row({"messages": messages}, "messages", tokenizer, max_length=128)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == full  # the template's own text, cut but not changed
    trained = [t if label != IGNORE_INDEX else None for t, label in zip(row["input_ids"], row["labels"])]
    spans = "".join(tokenizer.decode([t]) if t is not None else "|" for t in trained).split("|")
    assert [span for span in spans if span] == ["cd</s>", "gh</s>"]  # both assistant turns, nothing else


def test_conversational_prompt_completion_trains_the_completion(tokenizer):
    prompt = [{"role": "user", "content": "ab"}]
    completion = [{"role": "assistant", "content": "cd"}]
    row = tokenize_row({"prompt": prompt, "completion": completion}, "prompt+completion", tokenizer, max_length=64)
    as_chat = tokenize_row({"messages": prompt + completion}, "messages", tokenizer, max_length=64)
    assert row == as_chat
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "cd</s>"


def test_a_completion_mask_marks_the_trained_tokens():
    row = tokenize_row({"input_ids": [1, 5, 6, 7], "completion_mask": [0, 0, 1, 1]}, "input_ids", None, 64)
    assert row == {"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7]}


def test_text_and_pretokenized_rows_train_every_token(tokenizer):
    text_row = tokenize_row({"text": "ab"}, "text", tokenizer, max_length=64)
    assert text_row["labels"] == text_row["input_ids"] == tokenizer("ab")["input_ids"] + [2]
    ids_row = tokenize_row({"input_ids": [1, 5, 6]}, "input_ids", tokenizer=None, max_length=2)
    assert ids_row == {"input_ids": [1, 5], "labels": [1, 5]}


def test_every_dataset_format_trains(tokenizer, tmp_path):
    rows = corpus_dataset(8)
    formats = {
        "prompt+completion": rows,
        "text": corpus_dataset(8, columns=("text",)),
        "messages": Dataset.from_list(
            [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"]},
                    ]
                }
                for r in rows
            ]
        ),
        "input_ids": Dataset.from_list([tokenize_row(r, "prompt+completion", tokenizer, 64) for r in rows]),
    }
    for name, dataset in formats.items():
        trainer = DistillTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
            teacher_model=peaked_teacher(tokenizer),
            args=fast_args(DistillConfig, tmp_path, lmbda=0.0, max_steps=1),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        assert trainer.state.log_history[0]["loss"] > 0, name


def test_unknown_columns_are_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Cannot tell how to train"):
        DistillTrainer(
            model=tiny_llama(num_hidden_layers=1, tokenizer=tokenizer),
            teacher_model=peaked_teacher(tokenizer),
            args=fast_args(DistillConfig, tmp_path),
            train_dataset=Dataset.from_list([{"question": "a", "answer": "b"}]),
            processing_class=tokenizer,
        )


# ----- the loss ----------------------------------------------------------------------------------------------------


def test_loss_is_the_token_mean_of_the_divergence_on_the_shared_vocabulary(tokenizer, tmp_path):
    # The teacher's LM head is padded to 40 rows, the draft's to 32 (the tokenizer has 32 tokens).
    trainer = make_trainer(tokenizer, tmp_path, teacher=peaked_teacher(tokenizer, vocab_size=40), divergence="tvd")
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    student, teacher = shared_vocab(student[:, :-1][mask], teacher[:, :-1][mask])
    assert teacher.shape[-1] == 32
    assert loss.item() == pytest.approx(total_variation(student, teacher).mean().item(), rel=1e-5)


def test_cross_entropy_weight_adds_the_label_loss(tokenizer, tmp_path):
    plain = make_trainer(tokenizer, tmp_path, divergence="forward_kl")
    with_ce = make_trainer(tokenizer, tmp_path, divergence="forward_kl", ce_weight=0.5)
    batch = first_batch(plain)
    with torch.no_grad():
        logits = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][mask], batch["labels"][:, 1:][mask])
        difference = with_ce.compute_loss(with_ce.model, batch) - plain.compute_loss(plain.model, batch)
    assert difference.item() == pytest.approx(0.5 * ce.item(), rel=1e-4)


def test_a_subclass_can_override_the_divergence(tokenizer, tmp_path):
    class SquaredErrorTrainer(DistillTrainer):
        def divergence(self, student_logits, teacher_logits, temperature):
            return (student_logits.softmax(-1) - teacher_logits.softmax(-1)).pow(2).sum(-1)

    trainer = SquaredErrorTrainer(
        model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
        teacher_model=peaked_teacher(tokenizer),
        args=fast_args(DistillConfig, tmp_path, lmbda=0.0),
        train_dataset=corpus_dataset(8),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        expected = (student[:, :-1][mask].softmax(-1) - teacher[:, :-1][mask].softmax(-1)).pow(2).sum(-1).mean()
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.train()
    assert trainer.state.global_step == 2


# ----- on-policy and teacher-generated data ----------------------------------------------------------------------


def test_on_policy_batches_keep_prompts_and_recount_the_normaliser(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=5)
    original = first_batch(trainer)
    batches, num_items = trainer.get_batch_samples(iter([dict(original)]), 1, trainer.args.device)
    generated = batches[0]
    assert generated["data_source"] == "student"
    for row in range(len(original["input_ids"])):
        prompt_length = int((original["labels"][row] == IGNORE_INDEX).long().cumprod(0).sum())
        assert (
            generated["input_ids"][row, :prompt_length].tolist() == original["input_ids"][row, :prompt_length].tolist()
        )
        assert 1 <= int((generated["labels"][row] != IGNORE_INDEX).sum()) <= 5
    assert num_items == int((generated["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert num_items != int((original["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_on_policy_generation_warns_when_rows_have_no_prompt(tokenizer, tmp_path):
    from datasets import Dataset

    trainer = DistillTrainer(
        model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), teacher_model=peaked_teacher(tokenizer),
        args=fast_args(DistillConfig, tmp_path, lmbda=1.0, max_new_tokens=3),
        train_dataset=Dataset.from_list([{"text": "ab cd"}, {"text": "ef gh"}]), processing_class=tokenizer)
    with pytest.warns(UserWarning, match="some rows have none"):
        trainer.get_batch_samples(iter([first_batch(trainer)]), 1, trainer.args.device)


def test_seq_kd_uses_teacher_generations(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0, seq_kd=True, max_new_tokens=4)
    batches, _ = trainer.get_batch_samples(iter([first_batch(trainer)]), 1, trainer.args.device)
    assert batches[0]["data_source"] == "teacher"
    assert int((batches[0]["labels"] != IGNORE_INDEX).sum(1).max()) <= 4


def test_on_policy_training_runs_and_logs_its_fraction(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.5, max_new_tokens=6, max_steps=4, logging_steps=4)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["on_policy"] <= 1.0 and logged["loss"] > 0


# ----- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["tvd", "forward_kl"])
def test_training_lowers_heldout_divergence_and_raises_expected_acceptance(tokenizer, tmp_path, divergence):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        train_rows=64,
        eval_rows=16,
        divergence=divergence,
        learning_rate=1e-2,
        max_steps=30,
        logging_steps=30,
        per_device_train_batch_size=8,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_divergence"] < 0.8 * before["eval_divergence"]
    assert after["eval_expected_acceptance"] > before["eval_expected_acceptance"] + 0.05
    assert {"expected_acceptance", "top1_agreement", "divergence"} <= set(trainer.state.log_history[0])


# ----- saving, PEFT, resuming, reporting ---------------------------------------------------------------------------


def test_save_writes_a_checkpoint_with_model_card_and_tags(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "DistillTrainer" in card and "2310.08461" in card and "- distillspec" in card
    assert (out / "checkpoint-2" / "README.md").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert "distillspec" in trainer.model.model_tags


def test_lora_drafter_round_trips(tokenizer, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    base_dir = tmp_path / "base"
    tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer).save_pretrained(base_dir)
    trainer = DistillTrainer(
        model=str(base_dir),
        teacher_model=peaked_teacher(tokenizer),
        args=fast_args(DistillConfig, tmp_path, lmbda=0.0, learning_rate=1e-2, max_steps=3),
        train_dataset=corpus_dataset(16),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert "library_name: peft" in (out / "README.md").read_text()

    input_ids = torch.tensor([tokenizer("ab cd ef")["input_ids"]])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        base = tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)(input_ids=input_ids).logits
        reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
        assert not torch.allclose(expected, base)  # LoRA actually learned something
        assert torch.allclose(reloaded(input_ids=input_ids).logits, expected, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-5)


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tokenizer, tmp_path):
    def run(directory, max_steps, resume=None):
        trainer = make_trainer(
            tokenizer,
            directory,
            eval_rows=0,
            lmbda=0.5,
            max_new_tokens=4,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "interrupted", 2)
    resumed = run(tmp_path / "interrupted", 4, resume=True)
    for name, value in straight.items():
        assert torch.allclose(value, resumed[name], atol=1e-6), name


def test_metrics_reach_reporting_callbacks(tokenizer, tmp_path):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = make_trainer(tokenizer, tmp_path, eval_strategy="steps", eval_steps=2, report_to="none")
    trainer.add_callback(recorder)
    trainer.train()
    keys = set().union(*recorder.logs)
    assert {"expected_acceptance", "top1_agreement", "eval_expected_acceptance", "eval_top1_agreement"} <= keys


# ----- configuration and errors ----------------------------------------------------------------------------------


def test_config_loads_from_yaml_and_cli(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text(
        "output_dir: out\ndivergence: jsd\nbeta: 0.3\nlmbda: 0.25\n"
        "teacher_model_init_kwargs:\n  dtype: bfloat16\ngeneration_kwargs: '{\"top_p\": 0.9}'\n"
    )
    (config,) = HfArgumentParser(DistillConfig).parse_yaml_file(str(path))
    assert (config.divergence, config.beta, config.lmbda) == ("jsd", 0.3, 0.25)
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"} and config.generation_kwargs == {"top_p": 0.9}
    (config,) = HfArgumentParser(DistillConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--divergence", "tvd", "--teacher_model_init_kwargs", '{"dtype": "float32"}']
    )
    assert config.divergence == "tvd" and config.teacher_model_init_kwargs == {"dtype": "float32"}


def test_every_config_field_has_help():
    from dataclasses import fields

    from transformers import TrainingArguments

    from trainers import AdaSPECConfig, SoFTConfig

    inherited = {f.name for f in fields(TrainingArguments)}
    for config_class in (DistillConfig, AdaSPECConfig, SoFTConfig):
        for f in fields(config_class):
            if f.name not in inherited:
                assert f.metadata.get("help"), f"{config_class.__name__}.{f.name}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lmbda": 1.5}, "lmbda is a probability"),
        ({"divergence": "jsd", "beta": 1.0}, "divergence='reverse_kl'"),
        ({"divergence": "kl"}, "unknown"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"ce_weight": -1.0}, "ce_weight"),
    ],
)
def test_bad_config_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(output_dir="o", **overrides)


def test_missing_teacher_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="pass `teacher_model=`"):
        DistillTrainer(model=tiny_llama(tokenizer=tokenizer), args=fast_args(DistillConfig, tmp_path))


def test_teacher_with_a_smaller_vocabulary_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        make_trainer(tokenizer, tmp_path, teacher=tiny_llama(vocab_size=24, tokenizer=tokenizer))


def test_teacher_path_with_another_tokenizer_is_a_clear_error(tokenizer, tmp_path):
    teacher_dir = tmp_path / "teacher"
    peaked_teacher(tokenizer).save_pretrained(teacher_dir)
    # Same tokens, different ids: a tokenizer from another family.
    reversed_vocab = {token: len(tokenizer) - 1 - i for token, i in tokenizer.get_vocab().items()}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(reversed_vocab, unk_token="<unk>")))
    other.save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="different tokenizer"):
        make_trainer(tokenizer, tmp_path, teacher=str(teacher_dir))


def test_teacher_loads_from_a_path_with_init_kwargs(tokenizer, tmp_path):
    teacher_dir = tmp_path / "teacher"
    peaked_teacher(tokenizer).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    trainer = make_trainer(
        tokenizer, tmp_path, teacher=str(teacher_dir), teacher_model_init_kwargs={"dtype": "float64"}
    )
    assert trainer.teacher_model.dtype == torch.float64
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    trainer.train()


def test_init_kwargs_for_an_instantiated_teacher_are_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="only apply when `teacher_model` is a path"):
        make_trainer(tokenizer, tmp_path, teacher_model_init_kwargs={"dtype": "float32"})


def test_student_dropout_is_disabled_by_default(tokenizer, tmp_path):
    student = tiny_llama(num_hidden_layers=1, tokenizer=tokenizer)
    student.config.attention_dropout = 0.3
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = 0.3
    make_trainer(tokenizer, tmp_path, student=student)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in student.model.layers)


@pytest.mark.parametrize("generation_kwargs", [{"top_p": 0.95}, {"do_sample": False}, '{"top_k": 5, "temperature": 0.7}'])
def test_generation_kwargs_override_the_on_policy_defaults(tokenizer, tmp_path, generation_kwargs):
    """The help text's own example (top_p) and the fix the config's error recommends (do_sample=False) used to crash
    with "got multiple values for keyword argument": the user's fields now replace the defaults."""
    trainer = make_trainer(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=3, generation_kwargs=generation_kwargs)
    batches, _ = trainer.get_batch_samples(iter([first_batch(trainer)]), 1, trainer.args.device)
    assert batches[0]["data_source"] == "student"
    expected = generation_kwargs if isinstance(generation_kwargs, dict) else {"top_k": 5, "temperature": 0.7}
    config = trainer.generation_config(trainer.eos_token_ids())
    assert all(getattr(config, key) == value for key, value in expected.items())


def test_training_forwards_build_no_kv_cache(tokenizer, tmp_path):
    """Student and frozen teacher forwards used to build a KV cache every step (use_cache defaults to True), which a
    training forward never reads: memory for nothing."""
    trainer = make_trainer(tokenizer, tmp_path)
    seen = []
    for model in (trainer.model, trainer.teacher_model):  # their decoders: what would build the cache
        model.get_decoder().register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                        with_kwargs=True)
    trainer.compute_loss(trainer.model, first_batch(trainer))
    assert len(seen) >= 2 and all(use_cache is False for use_cache in seen)  # (+ the LM-head check's first forwards)


def test_on_policy_generation_keeps_the_users_gradient_checkpointing_kwargs(tokenizer, tmp_path):
    """Generation turns gradient checkpointing off and on again; the user's kwargs must survive it."""
    args = fast_args(DistillConfig, tmp_path, lmbda=1.0, max_new_tokens=4, max_steps=1, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = DistillTrainer(tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), peaked_teacher(tokenizer),
                             args, train_dataset=corpus_dataset(8), processing_class=tokenizer)
    trainer.train()
    layer = trainer.accelerator.unwrap_model(trainer.model).model.layers[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
