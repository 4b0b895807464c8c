"""Eagle3Trainer: the TTT unroll computes exactly what drafting computes, training raises the acceptance of real
speculative decoding, the target's embedding stays shared and frozen, the update does not depend on how the batch
is split (accumulation, processes), the draft vocabulary, the config and its errors. From an offline teacher
dataset: with every id kept, the same loss, metrics and update as the live target; with few kept, training still
raises real acceptance with no target anywhere; the recipe runs from a recipes/offline_teacher.py folder."""

import dataclasses
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_corpus, tiny_llama, tiny_tokenizer
from trainer_test_utils import (
    corpus_dataset,
    fast_args,
    flat_weights,
    launch_two_processes,
    peaked_teacher,
    sgd_args,
)
from transformers import DynamicCache, TrainingArguments

from hf_specdec.eagle3 import Eagle3DraftModel
from trainers import BaseDrafterConfig, Eagle3Trainer, Eagle3TrainingConfig
from trainers.data import tokenize_dataset
from trainers.eagle3 import build_draft_vocabulary, generation_special_ids, ttt_attention_mask, ttt_unroll
from trainers.offline import TeacherMetadata, precompute_teacher
from trainers.teachers import LiveTeacher

HERE = Path(__file__).resolve().parent
LAYERS = [1, 2]  # hidden_states of the 2-layer test target that the heads read


def build_trainer(tmp_path, args_factory=fast_args, model=None, dataset=None, **overrides):
    tokenizer = tiny_tokenizer()
    settings = {"aux_hidden_state_layer_ids": LAYERS, "draft_vocab_size": 24, "ttt_steps": 3, **overrides}
    return Eagle3Trainer(
        model=model,
        teacher_model=peaked_teacher(tokenizer),
        args=args_factory(Eagle3TrainingConfig, Path(tmp_path), **settings),
        train_dataset=corpus_dataset(8, seed=7) if dataset is None else dataset,
        processing_class=tokenizer,
    )


def build_sgd(tmp_path, batch_size, accumulation, **overrides):
    """The trainer of one SGD step (lr 1), untrained; also the builder the two-process test's worker calls."""
    return build_trainer(tmp_path, sgd_args, per_device_train_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, **overrides)


def one_sgd_step(tmp_path, batch_size, accumulation, **overrides):
    trainer = build_sgd(tmp_path, batch_size, accumulation, **overrides)
    trainer.train()
    return trainer, flat_weights(trainer)


@functools.lru_cache(maxsize=1)
def target_text(num_rows: int = 64, new_tokens: int = 24):
    """The test target's own greedy continuations of corpus prompts (EAGLE-3 trains on the target's text): rows of
    `input_ids` with the continuation as `labels`."""
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    target = peaked_teacher(tokenizer)
    prompts = tokenizer([row["prompt"] for row in tiny_corpus(num_rows, seed=3)], return_tensors="pt",
                        padding=True, padding_side="left")
    with torch.no_grad():
        generated = target.generate(**prompts, do_sample=False, max_new_tokens=new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
    rows = []
    for ids, mask, continuation in zip(prompts["input_ids"], prompts["attention_mask"],
                                       generated[:, prompts["input_ids"].shape[1] :].tolist()):
        prompt = ids[mask.bool()].tolist()
        rows.append({"input_ids": prompt + continuation, "labels": [-100] * len(prompt) + continuation})
    return Dataset.from_list(rows)


def greedy_acceptance(target, head, tokenizer) -> float:
    """α of real speculative decoding (chains of 4, greedy) on held-out prompts; the output must be plain greedy's."""
    prompts = tokenizer([row["prompt"] for row in tiny_corpus(6, seed=99)], return_tensors="pt", padding=True,
                        padding_side="left")
    settings = dict(do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    drafter = head.as_drafter(num_draft_tokens=4)
    with torch.no_grad():
        speculative = target.generate(**prompts, assistant_model=drafter, **settings)
        assert torch.equal(speculative, target.generate(**prompts, **settings))
    stats = drafter.last_stats
    return int(stats.accepted.sum()) / int(stats.drafted.sum())


# ----- the TTT unroll is what inference computes -----------------------------------------------------------------


def drafted_logits(head, input_ids, features, root: int, depth: int) -> torch.Tensor:
    """What drafting computes, with the model and a cache: the committed pairs up to `root` (positions 0..root),
    then `depth` draft tokens teacher-forced to the real next tokens, each reading its parent's output state at the
    next position; returns the logits of the last step (they predict the token at root + 2 + depth)."""
    cache = DynamicCache()
    out = head(input_ids=input_ids[:, 1 : root + 2], features=features[:, : root + 1], cache=cache)
    state, logits = out.hidden_states[:, -1:], out.logits[:, -1]
    for step in range(1, depth + 1):
        token = input_ids[:, root + 1 + step : root + 2 + step]
        out = head(input_ids=token, hidden_states=state, position_ids=torch.tensor([[root + step]]), cache=cache)
        state, logits = out.hidden_states, out.logits[:, -1]
    return logits


@pytest.mark.parametrize("variant", [{}, {"norm_before_residual": True, "norm_output": True, "fc_norm": True}])
def test_every_ttt_step_equals_drafting_that_deep(variant):
    target = tiny_llama(num_hidden_layers=3, seed=1).eval()
    head = Eagle3DraftModel.from_target(target.config, draft_vocab=torch.tensor([0, 2, 5, 7, 9, 11, 20, 21, 30]),
                                        aux_hidden_state_layer_ids=[1, 2, 3], **variant).eval()
    head.attach_target(target)
    with torch.no_grad():  # a random head whose norms and layers all matter
        for parameter in head.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn_like(parameter))
    input_ids = torch.randint(3, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a right-padded row, as the collator builds them
    steps = 4
    with torch.no_grad():
        hidden = target(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        features = torch.stack([hidden[k] for k in (1, 2, 3)], dim=-2)
        unrolled = ttt_unroll(head, input_ids, attention_mask, features, steps)
        checked = 0
        for row in range(2):
            length = int(attention_mask[row].sum())
            for root in range(length - 1):
                for depth in range(min(steps, length - 1 - root)):  # the chain's tokens must be real text
                    expected = drafted_logits(head, input_ids[row : row + 1], features[row : row + 1], root, depth)
                    torch.testing.assert_close(unrolled[depth][row, root], expected[0], atol=2e-5, rtol=1e-4)
                    checked += 1
    assert checked == 48


def test_the_attention_mask_shows_committed_pairs_and_the_own_chain():
    # row 0 is a padding root (left padding): it sees only itself, and no other query sees it
    mask = ttt_attention_mask(torch.tensor([[False, True, True, True]]), step=2)[0, 0].int()
    assert mask.tolist() == [
        # step-0 keys  step-1 keys  step-2 keys
        [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1],
    ]


# ----- training ---------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_raises_real_acceptance(tmp_path):
    tokenizer = tiny_tokenizer()
    trainer = build_trainer(tmp_path, dataset=target_text(), max_steps=60, learning_rate=2e-2,
                            per_device_train_batch_size=8, logging_steps=10, per_device_eval_batch_size=16)
    head = trainer.accelerator.unwrap_model(trainer.model)
    target = trainer.teacher_model
    before = greedy_acceptance(target, head, tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["loss"] < 0.6 * logged[0]["loss"]
    assert {f"acc_{i}" for i in range(3)} <= set(logged[-1]) and logged[-1]["acc_0"] > logged[0]["acc_0"]
    assert 0 < logged[-1]["draft_vocab_coverage"] <= 1
    after = greedy_acceptance(target, head, tokenizer)
    assert after > before + 0.1, (before, after)
    metrics = trainer.evaluate(target_text())
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_acc_2"] <= 1

    trainer.save_model()
    out = Path(trainer.args.output_dir)
    loaded = Eagle3DraftModel.from_pretrained(out)  # without the embedding: it is the target's
    loaded.attach_target(target)
    assert torch.equal(loaded.d2t, head.d2t) and loaded.config.aux_hidden_state_layer_ids == LAYERS
    ids, features = torch.tensor([[1, 5, 6, 7]]), torch.randn(1, 4, 2, 32)
    torch.testing.assert_close(loaded(ids, features=features).logits, head(ids, features=features).logits)
    card = (out / "README.md").read_text()
    assert "2503.01840" in card and 'head = Eagle3DraftModel.from_pretrained("<this checkpoint>")' in card
    assert 'AutoModelForCausalLM.from_pretrained("<this checkpoint>")' not in card  # a head is not a causal LM


def test_the_embedding_is_the_targets_shared_and_frozen(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=2, learning_rate=1e-1)
    head = trainer.accelerator.unwrap_model(trainer.model)
    embedding = trainer.teacher_model.get_input_embeddings()
    before = embedding.weight.detach().clone()
    fc_before = head.fc.weight.detach().clone()
    trainer.train()
    assert head.get_input_embeddings() is embedding and not embedding.weight.requires_grad
    assert torch.equal(embedding.weight, before) and not torch.equal(head.fc.weight, fc_before)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(embedding.weight) not in optimized and id(head.fc.weight) in optimized


def test_a_fresh_head_drafts_over_the_most_frequent_trained_tokens(tmp_path):
    trainer = build_trainer(tmp_path, draft_vocab_size=10)
    head = trainer.accelerator.unwrap_model(trainer.model)
    target = trainer.teacher_model
    expected = build_draft_vocabulary(trainer.train_dataset, 32, 10, generation_special_ids(target))
    assert head.draft_to_target.tolist() == expected.tolist()
    assert target.generation_config.eos_token_id in expected.tolist()
    assert head.t2d.sum() == 10


def test_a_given_head_keeps_its_vocabulary_and_layers(tmp_path):
    target = peaked_teacher(tiny_tokenizer())
    head = Eagle3DraftModel.from_target(target.config, draft_vocab=torch.arange(0, 32, 2),
                                        aux_hidden_state_layer_ids=[0, 2])
    trainer = Eagle3Trainer(model=head, teacher_model=target,
                            args=fast_args(Eagle3TrainingConfig, tmp_path, ttt_steps=2),
                            train_dataset=corpus_dataset(8), processing_class=tiny_tokenizer())
    trainer.train()
    assert head.draft_to_target.tolist() == list(range(0, 32, 2)) and head.config.aux_hidden_state_layer_ids == [0, 2]


# ----- normalisation --------------------------------------------------------------------------------------------


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path):
    _, full = one_sgd_step(tmp_path / "full", batch_size=8, accumulation=1)
    _, accumulated = one_sgd_step(tmp_path / "ga", batch_size=4, accumulation=2)
    _, start = one_sgd_step(tmp_path / "zero", batch_size=8, accumulation=1, learning_rate=0.0)
    assert (full - start).abs().max() > 1e-3
    assert torch.allclose(full, accumulated, atol=1e-6)


def test_two_processes_give_the_single_process_update(tmp_path):
    facts = launch_two_processes(tmp_path, {"eagle3": {"builder": f"{Path(__file__).stem}:build_sgd"}})["eagle3"]
    assert facts["world_size"] == 2 and facts["student"]["wrapper"] == "ddp"  # the head is DDP-wrapped
    assert facts["frozen"]["teacher_model"]["wrapper"] == "none" and facts["frozen"]["teacher_model"]["frozen"]
    _, single = one_sgd_step(tmp_path / "single", batch_size=8, accumulation=1)
    assert torch.allclose(facts["weights"], single, atol=1e-6)


# ----- the recipe -------------------------------------------------------------------------------------------------


def test_recipe_trains_a_head_offline_and_reports_acceptance_per_step(tmp_path):
    sys.path.insert(0, str(HERE.parents[1] / "recipes"))
    from eagle3 import main

    tiny = ["--tiny_train_rows", "32", "--tiny_eval_rows", "16", "--tiny_target_steps", "3", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--ttt_steps", "2"]
    main(["--config", str(HERE.parents[1] / "recipes" / "configs" / "eagle3.yaml"), "--output_dir", str(tmp_path),
          *tiny])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"head before", "head after"}
    assert all(0 <= r["expected_acceptance"] <= 1 and {"acc_0", "acc_1"} <= set(r) for r in results.values())
    assert Eagle3DraftModel.from_pretrained(tmp_path).config.draft_vocab_size == 24


# ----- offline teachers -------------------------------------------------------------------------------------------


class AsStoredTrainer(Eagle3Trainer):
    """The live target's path, fed what a teacher dataset stores: bf16 states and bf16 log-probabilities."""

    def target_outputs(self, inputs, head):
        teacher, features = super().target_outputs(inputs, head)
        return LiveTeacher(logits=as_bf16(teacher.values().float().log_softmax(-1))), as_bf16(features)


def as_bf16(values):
    return values.to(torch.bfloat16).float()


def stored_teacher(target, rows, top_k: int, state_layers=LAYERS):
    return precompute_teacher(target, rows, top_k=top_k, state_layers=state_layers, progress=False)


def test_offline_teacher_keeping_every_id_trains_exactly_as_the_live_target(tmp_path):
    tokenizer = tiny_tokenizer()
    target = peaked_teacher(tokenizer)
    rows = tokenize_dataset(corpus_dataset(8, seed=7), tokenizer, 512)
    settings = {"aux_hidden_state_layer_ids": LAYERS, "draft_vocab_size": 24, "ttt_steps": 3,
                "per_device_train_batch_size": 8}
    online = AsStoredTrainer(teacher_model=target, args=sgd_args(Eagle3TrainingConfig, tmp_path / "on", **settings),
                             train_dataset=rows, processing_class=tokenizer)
    offline = Eagle3Trainer(target_config=target.config, target_embedding=target.get_input_embeddings().weight,
                            args=sgd_args(Eagle3TrainingConfig, tmp_path / "off", **settings),
                            train_dataset=stored_teacher(target, rows, top_k=32), processing_class=tokenizer)
    assert offline.teacher_model is None
    start = flat_weights(offline)
    assert torch.equal(start, flat_weights(online))
    online.train()
    offline.train()
    heads = [trainer.accelerator.unwrap_model(trainer.model) for trainer in (online, offline)]
    assert torch.equal(heads[0].d2t, heads[1].d2t)  # the draft vocabulary, counted on the same labels
    logged = [next(entry for entry in trainer.state.log_history if "loss" in entry) for trainer in (online, offline)]
    assert logged[0].keys() == logged[1].keys() and logged[0]["draft_vocab_coverage"] < 1  # rows were skipped
    for key in ("loss", "acc_0", "acc_1", "acc_2", "draft_vocab_coverage", "expected_acceptance"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-6), key
    gradient = start - flat_weights(online)  # one SGD step at lr 1: the update is minus the gradient
    assert gradient.abs().max() > 1e-2
    torch.testing.assert_close(start - flat_weights(offline), gradient, atol=1e-6, rtol=1e-4)


def test_offline_teacher_with_few_kept_ids_trains_a_head_with_no_target(tmp_path):
    tokenizer = tiny_tokenizer()
    target = peaked_teacher(tokenizer)
    stored = stored_teacher(target, target_text(), top_k=4)  # 4 of 32 ids, the rest one tail bucket
    trainer = Eagle3Trainer(target_embedding=target.get_input_embeddings(), target_config=target.config,
                            args=fast_args(Eagle3TrainingConfig, tmp_path, aux_hidden_state_layer_ids=LAYERS,
                                           draft_vocab_size=24, ttt_steps=3, max_steps=60, learning_rate=2e-2,
                                           per_device_train_batch_size=8, logging_steps=10),
                            train_dataset=stored, eval_dataset=stored.select(range(16)), processing_class=tokenizer)
    head = trainer.accelerator.unwrap_model(trainer.model)
    embedding = target.get_input_embeddings()
    before, start = greedy_acceptance(target, head, tokenizer), embedding.weight.detach().clone()
    trainer.train()
    assert torch.equal(head.get_input_embeddings().weight, start) and torch.equal(embedding.weight, start)  # frozen
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["loss"] < 0.6 * logged[0]["loss"] and logged[-1]["acc_0"] > logged[0]["acc_0"] + 0.2
    assert logged[-1]["expected_acceptance"] > logged[0]["expected_acceptance"]
    assert greedy_acceptance(target, head, tokenizer) > before + 0.1  # real drafting for the target improved
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_acc_2"] <= 1
    trainer.save_model()
    assert Eagle3DraftModel.from_pretrained(trainer.args.output_dir).config.draft_length == 3


def test_offline_teacher_errors(tmp_path):
    tokenizer = tiny_tokenizer()
    target = peaked_teacher(tokenizer)
    rows = tokenize_dataset(corpus_dataset(2), tokenizer, 512)
    stored = stored_teacher(target, rows, top_k=4)
    embedding = target.get_input_embeddings()
    args = fast_args(Eagle3TrainingConfig, tmp_path, aux_hidden_state_layer_ids=LAYERS)

    def build(train_dataset=stored, **kwargs):
        return Eagle3Trainer(args=args, train_dataset=train_dataset, processing_class=tokenizer, **kwargs)

    metadata = TeacherMetadata(teacher=None, top_k=4, temperature=1.0, state_layers=LAYERS, vocab_size=32)
    assert build(target_config=target.config, target_embedding=embedding, teacher_metadata=metadata).offline
    with pytest.raises(ValueError, match=r"stores the target's hidden_states \[0, 2\], but the head reads \[1, 2\]"):
        build(target_config=target.config, target_embedding=embedding,
              teacher_metadata=dataclasses.replace(metadata, state_layers=[0, 2]))
    with pytest.raises(ValueError, match="stored at temperature 2.0"):
        build(target_config=target.config, target_embedding=embedding,
              teacher_metadata=dataclasses.replace(metadata, temperature=2.0))
    with pytest.raises(ValueError, match=r"stores target states 32 wide per token, but the head reads 2 states .* \(64\)"):
        build(train_dataset=stored_teacher(target, rows, top_k=4, state_layers=[2]), target_config=target.config,
              target_embedding=embedding)
    with pytest.raises(ValueError, match="holds no `teacher_states`"):
        build(train_dataset=stored_teacher(target, rows, top_k=4, state_layers=None), target_config=target.config,
              target_embedding=embedding)
    with pytest.raises(ValueError, match="needs the target's input embedding"):
        build(target_config=target.config)
    with pytest.raises(ValueError, match="A fresh head is shaped after its target"):
        build(target_embedding=embedding)
    with pytest.raises(ValueError, match="either runs its teacher or reads its stored outputs"):
        build(teacher_model=target, eval_dataset=rows)
    with pytest.raises(ValueError, match="for training from an offline teacher dataset"):
        build(train_dataset=rows, teacher_model=target, target_embedding=embedding)
    head = Eagle3DraftModel.from_target(target.config, aux_hidden_state_layer_ids=LAYERS)
    with pytest.raises(ValueError, match="needs the target's input embedding"):
        build(model=head)
    trainer = build(model=head, target_embedding=embedding.weight)  # a given head needs the embedding only
    trainer.train()
    assert trainer.accelerator.unwrap_model(trainer.model).config.draft_length == args.ttt_steps


def test_recipe_trains_a_head_from_an_offline_teacher_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(HERE.parents[1] / "recipes"))
    import eagle3
    import offline_teacher
    import transformers

    offline_teacher.main(["--tiny", "true", "--tiny_train_rows", "32", "--tiny_eval_rows", "16",
                          "--tiny_target_steps", "3", "--output_dir", str(tmp_path / "teacher"), "--top_k", "8",
                          "--state_layers", "1", "2", "3"])

    def no_target(*args, **kwargs):
        raise AssertionError("an offline teacher loads no target")

    monkeypatch.setattr(eagle3, "tiny_models", no_target)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_target)
    eagle3.main(["--config", str(HERE.parents[1] / "recipes" / "configs" / "eagle3.yaml"), "--offline_teacher",
                 str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "head"), "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--ttt_steps", "2"])
    results = json.loads((tmp_path / "head" / "results.json").read_text())
    assert all(0 <= r["expected_acceptance"] <= 1 and {"acc_0", "acc_1"} <= set(r) for r in results.values())
    config = Eagle3DraftModel.from_pretrained(tmp_path / "head").config
    assert config.aux_hidden_state_layer_ids == [1, 2, 3] and config.draft_vocab_size == 24
    assert config.draft_length == 2 and config.verifier_name_or_path == str(tmp_path / "teacher" / "tiny-target")


# ----- the draft vocabulary -------------------------------------------------------------------------------------


def test_draft_vocabulary_keeps_special_tokens_and_the_most_frequent_ids():
    ids = torch.tensor([[5, 5, 5, 7, 7, 9, -100], [9, 3, 3, 8, 8, 6, 6]])  # 5:3, then 3/6/7/8/9 twice each
    assert build_draft_vocabulary(ids, 12, 4).tolist() == [3, 5, 6, 7]  # ties go to the lower id
    assert build_draft_vocabulary(ids, 12, 4, special_token_ids=[2, 11]).tolist() == [2, 3, 5, 11]
    assert build_draft_vocabulary([1, 1, 2], 5, 5).tolist() == [0, 1, 2, 3, 4]  # unseen ids fill up, by id
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1, 1, 1, 2, 2]], "labels": [[-100, -100, -100, 2, 2]]})
    assert build_draft_vocabulary(rows, 4, 1).tolist() == [2]  # a dataset counts its trained labels
    for bad, message in (((ids, 12, 13), "draft_vocab_size=13"), (([1, 40], 12, 4), r"\[0, 12\)"),
                         ((ids, 12, 1, [1, 2]), "cannot hold")):
        with pytest.raises(ValueError, match=message):
            build_draft_vocabulary(*bad)


# ----- configuration --------------------------------------------------------------------------------------------


def test_every_config_field_has_help():
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(Eagle3TrainingConfig) if f.name not in inherited]
    assert {"ttt_steps", "ttt_decay", "draft_vocab_size", "aux_hidden_state_layer_ids"} <= {f.name for f in own}
    assert {f.name for f in dataclasses.fields(BaseDrafterConfig)} - inherited <= {f.name for f in own}
    assert all(f.metadata.get("help") for f in own), [f.name for f in own if not f.metadata.get("help")]


def test_configuration_errors(tmp_path):
    for bad in ({"ttt_steps": 0}, {"ttt_decay": 0.0}, {"draft_vocab_size": 0}, {"aux_hidden_state_layer_ids": []}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fast_args(Eagle3TrainingConfig, tmp_path, **bad)
    with pytest.raises(ValueError, match="needs `teacher_model=`"):
        Eagle3Trainer(args=fast_args(Eagle3TrainingConfig, tmp_path), train_dataset=corpus_dataset(8))
    with pytest.raises(TypeError, match="Eagle3DraftModel"):
        build_trainer(tmp_path, model=tiny_llama(num_hidden_layers=1))
    with pytest.raises(ValueError, match="hidden_states indices 0..2"):
        build_trainer(tmp_path, aux_hidden_state_layer_ids=[1, 5])
    target = peaked_teacher(tiny_tokenizer())
    head = Eagle3DraftModel.from_target(target.config, aux_hidden_state_layer_ids=LAYERS)
    with pytest.raises(ValueError, match="a given head keeps its own"):
        build_trainer(tmp_path, model=head)  # asks for a 24-token draft vocabulary; the head has all 32
    with pytest.raises(ValueError, match="chooses its vocabulary from `train_dataset`"):
        Eagle3Trainer(teacher_model=target, processing_class=tiny_tokenizer(),
                      args=fast_args(Eagle3TrainingConfig, tmp_path, aux_hidden_state_layer_ids=LAYERS,
                                     draft_vocab_size=8))


@pytest.mark.parametrize("norm_output", [False, True])
def test_the_chunked_ttt_loss_and_gradients_equal_whole_logits(tmp_path, norm_output):
    """Every TTT step's LM head runs one checkpointed chunk of drafts at a time; loss and gradients are those of the
    whole logits (`loss_chunk_size=0`)."""
    trainer = build_trainer(tmp_path, draft_vocab_size=24)
    trainer.accelerator.unwrap_model(trainer.model).config.norm_output = norm_output
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    results = []
    for chunk_size in (0, 5):
        trainer.args.loss_chunk_size = chunk_size
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(40))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
    (loss, grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(chunked_grads) > 3
    for grad, chunked_grad in zip(grads, chunked_grads):
        torch.testing.assert_close(chunked_grad, grad, rtol=1e-4, atol=1e-6)
