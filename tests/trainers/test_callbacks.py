"""SpeculativeDecodingCallback: real speculative decoding (α, τ) and expected acceptance on the target's own text,
logged while a drafter trains; the numbers equal a direct `generate(assistant_model=...)`, a copy of the target
accepts everything, the drafter and the training RNG are left as they were, and every drafter kind is measured."""

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama
from trainer_test_utils import corpus_dataset, fast_args, peaked_teacher, worker_env

from hf_specdec import ModelDrafter
from trainers import DistillConfig, DistillTrainer, SoFTConfig, SoFTTrainer
from trainers.callbacks import SpeculativeDecodingCallback, prompt_token_ids

HERE = Path(__file__).resolve().parent
DRAFT_LENGTH = 3
NEW_TOKENS = 4 * (DRAFT_LENGTH + 1)  # 4 fully accepted rounds of a perfect drafter (the prompt ends in the root)


def held_out_prompts(count=6):
    return [row["prompt"] for row in corpus_dataset(count, seed=3)]


def distill_trainer(tokenizer, tmp_path, callback, student=None, teacher=None, eval_rows=4, **config):
    teacher = teacher if teacher is not None else peaked_teacher(tokenizer)
    student = student if student is not None else tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=fast_args(DistillConfig, Path(tmp_path), **{"lmbda": 0.0, **config}),
        train_dataset=corpus_dataset(16),
        eval_dataset=corpus_dataset(eval_rows, seed=1) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    assert callback.trainer is trainer  # the drafter trainers bind the callbacks they are given
    return trainer


def spec_entries(trainer):
    return [entry for entry in trainer.state.log_history if "spec/alpha" in entry]


def direct_generate(target, drafter_model, tokenizer, prompts, batch_size, **generate_kwargs):
    """α and τ of hf_specdec's generate(assistant_model=...) on the same prompts, batches and settings."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    accepted = drafted = rounds = 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
        out = target.generate(**batch, assistant_model=ModelDrafter(drafter_model, num_draft_tokens=DRAFT_LENGTH),
                              return_dict_in_generate=True, **generate_kwargs)
        stats = out.spec_stats
        accepted += int(stats.accepted.sum())
        drafted += int(stats.drafted.sum())
        rounds += int(stats.rounds.sum())
    return accepted / drafted, (accepted + rounds) / rounds


# ----- during training ----------------------------------------------------------------------------------------------


def test_training_logs_alpha_tau_and_acceptance_on_target_text_equal_to_direct_generate(tokenizer, tmp_path):
    prompts = held_out_prompts()
    callback = SpeculativeDecodingCallback(prompts, max_new_tokens=NEW_TOKENS, num_draft_tokens=DRAFT_LENGTH,
                                           batch_size=4)  # two generate() calls: sums over batches
    trainer = distill_trainer(tokenizer, tmp_path, callback, eval_strategy="steps", eval_steps=1, max_steps=2,
                              learning_rate=3e-2)
    trainer.train()
    entries = spec_entries(trainer)
    assert [entry["step"] for entry in entries] == [1, 2]  # one entry per evaluation
    for entry in entries:
        assert 0.0 <= entry["spec/alpha"] <= 1.0
        assert 1.0 <= entry["spec/tau"] <= DRAFT_LENGTH + 1
        assert 0.0 < entry["spec/draft_tokens_per_round"] <= DRAFT_LENGTH
        assert 0.0 < entry["spec/expected_acceptance_on_target"] < 1.0
        assert 0.0 <= entry["spec/top1_agreement_on_target"] <= 1.0
        assert entry["spec/target_tokens"] > 0 and entry["spec/new_tokens_per_prompt"] > 0
    assert entries[0]["spec/expected_acceptance_on_target"] != entries[1]["spec/expected_acceptance_on_target"]

    # the last evaluation saw the final weights: the engine, run directly, reports the same α and τ
    drafter_model = trainer.accelerator.unwrap_model(trainer.model)
    alpha, tau = direct_generate(trainer.teacher_model, drafter_model, tokenizer, prompts, 4,
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
    assert entries[-1]["spec/alpha"] == alpha and entries[-1]["spec/tau"] == tau

    metrics = trainer.evaluate()  # added to the evaluation's metrics too (metric_for_best_model="spec/alpha")
    assert metrics["eval_spec/alpha"] == alpha and "eval_spec/expected_acceptance_on_target" in metrics


def test_sampled_decoding_is_seeded_and_equals_direct_generate(tokenizer, tmp_path):
    prompts = held_out_prompts(4)
    callback = SpeculativeDecodingCallback(prompts, max_new_tokens=12, num_draft_tokens=DRAFT_LENGTH, do_sample=True,
                                           temperature=0.8, seed=5, batch_size=4, expected_acceptance=False)
    trainer = distill_trainer(tokenizer, tmp_path, callback, eval_rows=0)
    rng = torch.get_rng_state()
    first, second = callback.measure(), callback.measure()
    assert first == {**second, "spec/decode_seconds": first["spec/decode_seconds"]}
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched

    torch.manual_seed(5)
    alpha, tau = direct_generate(trainer.teacher_model, trainer.model, tokenizer, prompts, 4, max_new_tokens=12,
                                 do_sample=True, temperature=0.8)
    assert first["spec/alpha"] == alpha and first["spec/tau"] == tau


def test_a_copy_of_the_target_accepts_every_draft_token(tokenizer, tmp_path):
    teacher = peaked_teacher(tokenizer)
    callback = SpeculativeDecodingCallback(held_out_prompts(), max_new_tokens=NEW_TOKENS,
                                           num_draft_tokens=DRAFT_LENGTH, batch_size=8,
                                           generation_kwargs={"min_new_tokens": NEW_TOKENS})  # no early EOS
    trainer = distill_trainer(tokenizer, tmp_path, callback, student=copy.deepcopy(teacher), teacher=teacher)
    metrics = trainer.evaluate()
    entry = spec_entries(trainer)[-1]
    assert entry["spec/alpha"] == 1.0 and entry["spec/per_token_acceptance"] == 1.0
    assert entry["spec/tau"] == DRAFT_LENGTH + 1 and entry["spec/draft_tokens_per_round"] == DRAFT_LENGTH
    assert entry["spec/new_tokens_per_prompt"] == NEW_TOKENS
    assert entry["spec/expected_acceptance_on_target"] == pytest.approx(1.0, abs=1e-5)
    assert entry["spec/top1_agreement_on_target"] == 1.0
    assert metrics["eval_spec/tau"] == DRAFT_LENGTH + 1


def test_the_drafter_keeps_its_mode_gets_no_gradients_and_is_measured_once_per_step(tokenizer, tmp_path):
    callback = SpeculativeDecodingCallback(held_out_prompts(3), max_new_tokens=8, num_draft_tokens=2)
    trainer = distill_trainer(tokenizer, tmp_path, callback, eval_rows=0)
    model = trainer.model.train()
    callback.measure()
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not trainer.teacher_model.training

    # several eval datasets: one measurement and one log entry, its numbers added to each dataset's metrics
    eval_sets = {"a": corpus_dataset(4, seed=1), "b": corpus_dataset(4, seed=2)}
    trainer.eval_dataset = {name: trainer._tokenize(ds, tokenizer, trainer.args) for name, ds in eval_sets.items()}
    metrics = trainer.evaluate()
    assert len(spec_entries(trainer)) == 1
    assert metrics["eval_a_spec/alpha"] == metrics["eval_b_spec/alpha"] == spec_entries(trainer)[0]["spec/alpha"]


def test_every_n_steps_without_evaluation(tokenizer, tmp_path):
    callback = SpeculativeDecodingCallback(held_out_prompts(2), max_new_tokens=6, num_draft_tokens=2, eval_steps=2,
                                           at_train_begin=True, expected_acceptance=False)
    trainer = distill_trainer(tokenizer, tmp_path, callback, eval_rows=0, max_steps=4)
    trainer.train()
    assert [entry["step"] for entry in spec_entries(trainer)] == [0, 2, 4]
    assert all("spec/expected_acceptance_on_target" not in entry for entry in spec_entries(trainer))
    # the training metrics stay in the training logs (the callback's entries do not take them)
    assert all("expected_acceptance" in entry for entry in trainer.state.log_history if "loss" in entry)


def ddp_callback():
    return SpeculativeDecodingCallback(held_out_prompts(5), max_new_tokens=8, num_draft_tokens=2, batch_size=2)


def test_two_processes_decode_a_shard_each_and_log_the_whole_prompt_sets_numbers(tokenizer, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path)]
    result = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = json.loads((tmp_path / "spec.json").read_text())
    assert logged["world_size"] == 2 and logged["shards"] == [3, 2]  # 5 prompts: ranks take 0, 2, 4 and 1, 3

    callback = ddp_callback()  # one process, every prompt, the same (untrained: lr 0) drafter
    distill_trainer(tokenizer, tmp_path / "single", callback, eval_rows=0)
    single = callback.measure()
    for key in ("spec/alpha", "spec/tau", "spec/draft_tokens_per_round", "spec/target_tokens"):
        assert logged["entry"][key] == single[key], key
    assert logged["entry"]["spec/expected_acceptance_on_target"] == pytest.approx(
        single["spec/expected_acceptance_on_target"], rel=1e-6)


# ----- other drafters -----------------------------------------------------------------------------------------------


def test_soft_drafts_with_its_exits_and_the_full_depth_exit_matches_a_copy_of_itself(tokenizer, tmp_path):
    model = tiny_llama(num_hidden_layers=3, seed=4, tokenizer=tokenizer)
    target = copy.deepcopy(model)
    callback = SpeculativeDecodingCallback(held_out_prompts(4), max_new_tokens=8, num_draft_tokens=2, target=target)
    trainer = SoFTTrainer(model=model, args=fast_args(SoFTConfig, Path(tmp_path), exits=[1, 3]),
                          train_dataset=corpus_dataset(8), processing_class=tokenizer, callbacks=[callback])
    callback.bind(trainer)
    metrics = callback.measure()
    assert 0.0 <= metrics["spec/alpha"] <= 1.0 and 1.0 <= metrics["spec/tau"] <= 3.0
    assert metrics["spec/exit_1/draft_share"] + metrics["spec/exit_3/draft_share"] == pytest.approx(1.0)
    assert metrics["spec/exit_3/expected_acceptance_on_target"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["spec/exit_1/expected_acceptance_on_target"] < 1.0
    assert metrics["spec/expected_acceptance_on_target"] == metrics["spec/exit_1/expected_acceptance_on_target"]

    unbound_target = SpeculativeDecodingCallback(["ab"], max_new_tokens=4).bind(trainer)
    with pytest.raises(ValueError, match="target=target"):
        unbound_target.measure()


def test_guided_eagle3_and_lora_drafters_are_measured(tmp_path):
    from peft import LoraConfig
    from tiny import tiny_tokenizer

    from trainers import Eagle3Trainer, Eagle3TrainingConfig, GuidedDrafterConfig, GuidedDrafterTrainer

    tokenizer = tiny_tokenizer()
    prompts = held_out_prompts(3)
    built = {
        "lora": lambda callback: DistillTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), teacher_model=peaked_teacher(tokenizer),
            args=fast_args(DistillConfig, Path(tmp_path) / "l", lmbda=0.0), train_dataset=corpus_dataset(8),
            processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            callbacks=[callback]),
        "guided": lambda callback: GuidedDrafterTrainer(
            model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), teacher_model=peaked_teacher(tokenizer),
            args=fast_args(GuidedDrafterConfig, Path(tmp_path) / "g", verifier_layers=[1, 2], draft_length=2),
            train_dataset=corpus_dataset(8), processing_class=tokenizer, callbacks=[callback]),
        "eagle3": lambda callback: Eagle3Trainer(
            teacher_model=peaked_teacher(tokenizer),
            args=fast_args(Eagle3TrainingConfig, Path(tmp_path) / "e", aux_hidden_state_layer_ids=[1, 2],
                           draft_vocab_size=24, ttt_steps=2),
            train_dataset=corpus_dataset(8), processing_class=tokenizer, callbacks=[callback]),
    }
    for name, build in built.items():
        callback = SpeculativeDecodingCallback(prompts, max_new_tokens=8, num_draft_tokens=2)
        trainer = build(callback)
        callback.bind(trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        embedding = model.get_input_embeddings()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # e.g. a PEFT wrapper handed the cache as past_key_values
            metrics = callback.measure()
        assert 0.0 <= metrics["spec/alpha"] <= 1.0 and 1.0 <= metrics["spec/tau"] <= 3.0, name
        assert 0.0 < metrics["spec/expected_acceptance_on_target"] < 1.0, name
        assert metrics["spec/target_tokens"] > 0, name
        assert model.get_input_embeddings() is embedding, name  # an EAGLE-3 head keeps its own reference


# ----- prompts and errors -------------------------------------------------------------------------------------------


def test_prompts_from_text_ids_chats_and_trainer_rows(tokenizer):
    text_ids = tokenizer("ab cd")["input_ids"]
    assert prompt_token_ids(["ab cd"], tokenizer) == [text_ids]
    assert prompt_token_ids([torch.tensor(text_ids), text_ids], tokenizer) == [text_ids, text_ids]
    assert prompt_token_ids([{"prompt": "ab cd", "completion": " ef"}], tokenizer) == [text_ids]
    assert prompt_token_ids([{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}]) == [[1, 5]]
    chat = [{"role": "user", "content": "ab"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt_token_ids([{"prompt": chat}], tokenizer) == [expected]
    assert prompt_token_ids([{"messages": chat + [{"role": "assistant", "content": "cd"}]}], tokenizer) == [expected]
    assert len(prompt_token_ids(corpus_dataset(5), tokenizer, max_prompts=3)) == 3
    with pytest.raises(ValueError, match="no prompt"):
        prompt_token_ids([{"text": "ab"}], tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        prompt_token_ids(["ab"])


def test_an_unbound_callback_says_how_to_bind_it(tokenizer, tmp_path):
    """The drafter trainers bind it themselves; another Trainer (e.g. a plain transformers one) must be told."""
    from transformers import Trainer, TrainingArguments

    callback = SpeculativeDecodingCallback(["ab"], max_new_tokens=4)
    trainer = Trainer(model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
                      args=TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True),
                      train_dataset=corpus_dataset(8), callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"callback.bind\(trainer\)"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control)
    with pytest.raises(ValueError, match="nothing to log"):
        SpeculativeDecodingCallback(["ab"], decode=False, expected_acceptance=False)


if __name__ == "__main__":  # 2 CPU processes (launched by torchrun from the test above): one step at lr 0, evaluated
    from tiny import tiny_tokenizer

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    callback = ddp_callback()
    trainer = distill_trainer(tiny_tokenizer(), out / "ddp", callback, eval_rows=4, max_steps=1, learning_rate=0.0,
                              eval_strategy="steps", eval_steps=1, ddp_backend="gloo", use_cpu=True)
    trainer.train()
    shards = [None] * trainer.args.world_size
    torch.distributed.all_gather_object(shards, len(callback.shard_prompt_ids()))
    if trainer.args.process_index == 0:
        entry = spec_entries(trainer)[-1]
        (out / "spec.json").write_text(json.dumps({"world_size": trainer.args.world_size, "shards": shards,
                                                   "entry": entry}))
