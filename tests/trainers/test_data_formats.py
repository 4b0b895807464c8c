"""TRL's data formats: streaming (`IterableDataset`) datasets, packing, padding-free batches with position ids that
restart per sequence, and a TRL-style script where `DistillTrainer` replaces `SFTTrainer` on the same data.

The equalities here are what make packing and padding-free batches safe: a padding-free (or packed) batch gives the
same logits as its rows run one by one, and the trainers' losses and gradients on it equal those of the padded
batch of the same rows."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from datasets import Dataset, IterableDataset
from tiny import tiny_corpus, tiny_llama
from trainer_test_utils import corpus_dataset, fast_args, flat_weights, peaked_teacher
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from trainers import AdaSPECConfig, AdaSPECTrainer, DistillConfig, DistillTrainer, SoFTConfig, SoFTTrainer
from trainers.data import (
    DraftDataCollator,
    best_fit_decreasing,
    concat_rows,
    pack_rows,
    prepare_dataset,
    tokenize_dataset,
)
from trainers.losses import IGNORE_INDEX

# ----- the TRL dataset formats, built from the tiny corpus ---------------------------------------------------------

FORMATS = ("text", "prompt_completion", "messages", "conversational_prompt_completion")


def format_rows(row_format: str, num_rows: int, seed: int = 0) -> list[dict]:
    rows = []
    for row in tiny_corpus(num_rows, seed=seed):
        user = [{"role": "user", "content": row["prompt"]}]
        assistant = [{"role": "assistant", "content": row["completion"]}]
        rows.append({
            "text": {"text": row["text"]},
            "prompt_completion": {"prompt": row["prompt"], "completion": row["completion"]},
            "messages": {"messages": user + assistant},
            "conversational_prompt_completion": {"prompt": user, "completion": assistant},
        }[row_format])
    return rows


def streamed(rows: list[dict]) -> IterableDataset:
    """A stream without known features (as from a generator): its format must be read from its first row."""

    def generate(rows):
        yield from rows

    return IterableDataset.from_generator(generate, gen_kwargs={"rows": rows})


def as_lists(dataset) -> list[dict]:
    return [{key: list(value) for key, value in row.items()} for row in dataset]


# ----- streaming datasets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row_format", [*FORMATS, "input_ids"])
def test_an_iterable_dataset_tokenizes_to_the_rows_of_the_dataset(tokenizer, row_format):
    rows = format_rows(row_format, 6) if row_format != "input_ids" else [
        {"input_ids": [1, 5, 6, 7], "completion_mask": [0, 0, 1, 1]}, {"input_ids": [1, 8, 9], "completion_mask": [0, 1, 1]}]
    expected = as_lists(tokenize_dataset(Dataset.from_list(rows), tokenizer, max_length=24))
    assert as_lists(tokenize_dataset(streamed(rows), tokenizer, max_length=24)) == expected
    with_features = Dataset.from_list(rows).to_iterable_dataset()
    assert as_lists(tokenize_dataset(with_features, tokenizer, max_length=24)) == expected
    packed = as_lists(prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=48, packing=True))
    assert as_lists(prepare_dataset(streamed(rows), tokenizer, max_length=48, packing=True)) == packed


def test_a_stream_is_tokenized_and_packed_lazily(tokenizer):
    def endless():
        rng = random.Random(0)
        while True:
            yield {"text": "".join(rng.choices("abc ", k=rng.randint(3, 20)))}

    stream = IterableDataset.from_generator(endless)
    packed = prepare_dataset(stream, tokenizer, max_length=32, packing=True, packing_window=50)
    first = next(iter(packed))  # reads one window of rows, not the (endless) stream
    assert len(first["input_ids"]) <= 32 and first["position_ids"][0] == 0


@pytest.mark.parametrize("padding_free", [False, True])
def test_distill_trains_on_an_iterable_dataset(tokenizer, tmp_path, padding_free):
    student = tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    trainer = DistillTrainer(
        model=student, teacher_model=peaked_teacher(tokenizer),
        args=fast_args(DistillConfig, tmp_path, lmbda=0.0, max_steps=2, padding_free=padding_free),
        train_dataset=streamed(format_rows("prompt_completion", 16)), processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == (1 if padding_free else 4)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(flat_weights(trainer), before)


# ----- packing -----------------------------------------------------------------------------------------------------


def random_rows(num_rows: int, max_row: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        n = rng.randint(1, max_row)
        ids = [rng.randrange(4, 32) for _ in range(n)]
        prompt = rng.randint(0, n - 1)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def segments(packed_row: dict) -> list[slice]:
    starts = [i for i, p in enumerate(packed_row["position_ids"]) if p == 0]
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], len(packed_row["position_ids"])])]


@pytest.mark.parametrize("max_length", [7, 16, 64])
def test_packing_keeps_every_row_whole_once_and_marks_where_each_starts(max_length):
    rows = random_rows(200, max_row=min(max_length, 20), seed=max_length)
    packed = pack_rows(rows, max_length)
    found = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_length
        for cut in segments(row):
            n = cut.stop - cut.start
            assert row["position_ids"][cut] == list(range(n))  # positions restart at every original row
            assert row["labels"][cut.start] == IGNORE_INDEX  # never a target across a boundary
            found.append((tuple(row["input_ids"][cut]), tuple(row["labels"][cut][1:])))
    # every original row exactly once, whole, with the labels it trains (its first label is never a target)
    assert sorted(found) == sorted((tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in rows)
    trained = sum(label != IGNORE_INDEX for r in packed for label in r["labels"][1:])
    assert trained == sum(label != IGNORE_INDEX for r in rows for label in r["labels"][1:])
    lower_bound = math.ceil(sum(len(r["input_ids"]) for r in rows) / max_length)
    assert len(packed) <= 11 / 9 * lower_bound + 1  # best-fit decreasing's guarantee (11/9 OPT + 6/9)


def test_best_fit_decreasing_puts_each_item_into_the_fullest_bin_it_fits():
    assert best_fit_decreasing([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    assert best_fit_decreasing([6, 6], 6) == [[0], [1]]
    with pytest.raises(ValueError, match="cannot be packed"):
        best_fit_decreasing([7], 6)


def test_packed_datasets_and_trl_packed_rows(tokenizer):
    dataset = prepare_dataset(corpus_dataset(12), tokenizer, max_length=80, packing=True)
    plain = prepare_dataset(corpus_dataset(12), tokenizer, max_length=80)
    assert set(dataset.column_names) == {"input_ids", "labels", "position_ids"}
    assert len(dataset) < len(plain)
    assert sum(len(r) for r in dataset["input_ids"]) == sum(len(r) for r in plain["input_ids"])
    # rows packed already (TRL's `seq_lengths`, or position ids) keep their boundaries
    trl_packed = Dataset.from_list([{"input_ids": [1, 5, 6, 1, 7, 8, 9], "seq_lengths": [3, 4]}])
    row = prepare_dataset(trl_packed, None, max_length=64)[0]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert row["labels"] == [IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8, 9]


# ----- padding-free batches: the model's logits --------------------------------------------------------------------


def tiny_qwen2(attn_implementation: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def model_of(arch: str, attn_implementation: str):
    if arch == "qwen2":
        return tiny_qwen2(attn_implementation)
    model = tiny_llama(seed=0)
    model.config._attn_implementation = attn_implementation
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padding_free_logits_equal_the_rows_run_one_by_one(arch, attn_implementation):
    model = model_of(arch, attn_implementation)
    rows = random_rows(5, max_row=12, seed=3)
    batch = DraftDataCollator(pad_token_id=0, padding_free=True)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    packed = DraftDataCollator(pad_token_id=0, padding_free=True)(pack_rows(rows, max_length=24))
    with torch.no_grad():
        per_row = [model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0] for r in rows]
        free = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        # Why packed rows must go padding-free: with an attention mask, transformers ignores the restarting
        # position ids when building the mask, and the sequences attend to each other.
        masked = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                       position_ids=batch["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(free, torch.cat(per_row), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, torch.cat(per_row), atol=1e-3)
    by_ids = {tuple(r["input_ids"]): logits for r, logits in zip(rows, per_row)}
    packed_ids = packed["input_ids"][0].tolist()
    for cut in segments({"position_ids": packed["position_ids"][0].tolist()}):
        torch.testing.assert_close(packed_logits[cut], by_ids[tuple(packed_ids[cut])], rtol=1e-5, atol=1e-5)


def test_the_padding_free_collator_marks_boundaries_and_pads_as_a_sequence_of_its_own():
    rows = [{"input_ids": [1, 5, 6], "labels": [1, 5, 6]},
            {"input_ids": [1, 7, 8, 1, 9], "labels": [1, 7, 8, 1, 9], "position_ids": [0, 1, 2, 0, 1]}]
    batch = concat_rows(rows, pad_token_id=0, pad_to_multiple_of=5)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7, 8, 1, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7, 8, -100, 9, -100, -100]]
    with pytest.raises(ValueError, match="padding_free=True"):
        DraftDataCollator(pad_token_id=0)(rows)  # packed rows in a padded batch would attend across sequences


# ----- padding-free and packed batches: the trainers' losses and gradients -----------------------------------------


def build_trainer(kind: str, tokenizer, tmp_path):
    if kind == "soft":
        return SoFTTrainer(model=tiny_llama(num_hidden_layers=3, seed=4, tokenizer=tokenizer),
                           args=fast_args(SoFTConfig, tmp_path, exits=[1, 2, 3]),
                           train_dataset=corpus_dataset(8), processing_class=tokenizer)
    common = dict(model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
                  teacher_model=peaked_teacher(tokenizer), train_dataset=corpus_dataset(8), processing_class=tokenizer)
    if kind == "adaspec":
        return AdaSPECTrainer(ref_model=tiny_llama(num_hidden_layers=1, seed=3, tokenizer=tokenizer),
                              args=fast_args(AdaSPECConfig, tmp_path, k=0.5), **common)
    return DistillTrainer(args=fast_args(DistillConfig, tmp_path, lmbda=0.0, ce_weight=0.5, divergence="jsd"),
                          **common)


def loss_and_grad(trainer, batch, num_items):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["distill", "soft", "adaspec"])
def test_losses_and_gradients_on_padding_free_and_packed_batches_equal_the_padded_ones(kind, tokenizer, tmp_path):
    trainer = build_trainer(kind, tokenizer, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    padded = DraftDataCollator(trainer.pad_token_id)(rows)
    num_items = trainer.count_loss_tokens(padded)
    expected_loss, expected_grads = loss_and_grad(trainer, padded, num_items)
    longest = max(len(r["input_ids"]) for r in rows)
    for batch in (DraftDataCollator(trainer.pad_token_id, padding_free=True)(rows),
                  DraftDataCollator(trainer.pad_token_id, padding_free=True)(pack_rows(rows, 2 * longest))):
        assert trainer.count_loss_tokens(batch) == num_items
        loss, grads = loss_and_grad(trainer, batch, num_items)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_distill_with_packing_trains_on_packed_padding_free_batches(tokenizer, tmp_path):
    trainer = DistillTrainer(
        model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer), teacher_model=peaked_teacher(tokenizer),
        args=fast_args(DistillConfig, tmp_path, lmbda=0.0, packing=True, max_length=128),
        train_dataset=streamed(format_rows("messages", 24)), eval_dataset=corpus_dataset(6, seed=1),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert (batch["position_ids"] == 0).sum() > 4  # several conversations per packed row, 4 packed rows per batch
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("batching", ["packing", "padding_free"])
def test_on_policy_generation_with_packed_or_padding_free_batches_is_a_clear_error(batching, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="lmbda.*packing=False and padding_free=False"):
        DistillTrainer(model=tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer),
                       teacher_model=peaked_teacher(tokenizer),
                       args=fast_args(DistillConfig, tmp_path, lmbda=0.5, **{batching: True}),
                       train_dataset=corpus_dataset(8), processing_class=tokenizer)


# ----- a TRL-style script: SFTTrainer swapped for DistillTrainer ---------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = tiny_tokenizer()
    for name, model in (("student", tiny_llama(num_hidden_layers=1, seed=2, tokenizer=tokenizer)),
                        ("teacher", peaked_teacher(tokenizer))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


# one storage / batching per format, so the four runs cover streaming, packing, evaluation and plain padding
SCRIPT_CASES = {
    "text": ["--packing"],
    "prompt_completion": ["--dataset_streaming", "--eval_strategy", "steps", "--eval_steps", "2"],
    "messages": ["--dataset_streaming", "--packing"],
    "conversational_prompt_completion": ["--eval_strategy", "steps", "--eval_steps", "2"],
}


@pytest.mark.parametrize("trainer_name", ["sft", "distill"])
@pytest.mark.parametrize("row_format", FORMATS)
def test_a_trl_style_script_trains_with_either_trainer(row_format, trainer_name, checkpoints, tmp_path):
    import trl_style_script as script

    data = tmp_path / "data"
    data.mkdir()
    for split, num_rows, seed in (("train", 16, 0), ("test", 4, 1)):
        lines = [json.dumps(row) for row in format_rows(row_format, num_rows, seed)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--trainer", trainer_name, "--model_name_or_path", str(checkpoints / "student"),
            "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "64",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--bf16", "false",
            "--disable_tqdm", "true", *SCRIPT_CASES[row_format]]
    if trainer_name == "distill":
        argv += ["--teacher_model_name_or_path", str(checkpoints / "teacher"), "--lmbda", "0"]
    trainer = script.main(*script.parse(argv))

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    if "--eval_strategy" in argv:
        assert any(math.isfinite(entry.get("eval_loss", math.nan)) for entry in trainer.state.log_history)
    initial = AutoModelForCausalLM.from_pretrained(checkpoints / "student")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters()))
