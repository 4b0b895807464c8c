"""Offline teachers: stored top-k log-probabilities, tail mass and states are the target's (in the stored types),
the sparse divergence is exact for what it keeps (equal to the full one, gradients included, when nothing is cut;
over a student's sub-vocabulary, equal to the online divergence over it, for every divergence), and the recipe
stores what a drafter still needs of the target."""

import pytest
import torch
from torch.nn import functional as F

from hf_specdec.testing import tiny_causal_lm
from trainers.losses import DIVERGENCES
from trainers.offline import (
    OfflineTeacherCollator,
    coarse_log_probs,
    from_bf16_bits,
    precompute_teacher,
    sparse_forward_kl,
    to_bf16_bits,
)


def test_bf16_bits_round_trip():
    values = torch.randn(5, 7) * 100
    assert torch.equal(from_bf16_bits(to_bf16_bits(values).tolist()), values.to(torch.bfloat16).float())


def test_precomputed_rows_hold_the_targets_outputs():
    target = tiny_causal_lm(vocab_size=64, num_layers=3, seed=1)
    rows = [{"input_ids": [5, 9, 11, 30, 2], "labels": [-100, 9, 11, 30, 2]}, {"input_ids": [7, 8, 9]}]
    data = precompute_teacher(target, rows, top_k=8, state_layers=[1, 3], batch_size=2, progress=False)
    stored_types = {name: data.features[name].feature.feature.dtype
                    for name in ("teacher_top_ids", "teacher_top_logprobs", "teacher_states")}
    assert stored_types == {"teacher_top_ids": "int32", "teacher_top_logprobs": "int16", "teacher_states": "int16"}
    batch = OfflineTeacherCollator(pad_token_id=0)([data[0], data[1]])
    as_arrays = OfflineTeacherCollator(pad_token_id=0)([data.with_format("numpy")[i] for i in range(2)])
    assert batch.keys() == as_arrays.keys() and all(torch.equal(batch[k], as_arrays[k]) for k in batch)
    cut = OfflineTeacherCollator(pad_token_id=0, max_length=3)([data[0], data[1]])
    assert all(value.shape[1] == 3 and torch.equal(value, batch[name][:, :3]) for name, value in cut.items())
    assert batch["teacher_top_ids"].shape == (2, 5, 8) and batch["teacher_states"].shape == (2, 5, 2 * 64)
    with torch.no_grad():
        outputs = target(torch.tensor([rows[0]["input_ids"]]), output_hidden_states=True)
    log_p = outputs.logits[0].log_softmax(-1)
    top = log_p.topk(8, dim=-1)
    assert torch.equal(batch["teacher_top_ids"][0], top.indices)
    torch.testing.assert_close(batch["teacher_top_logprobs"][0], top.values, atol=0.05, rtol=0.01)  # bf16
    tail = log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(batch["teacher_tail_logprob"][0], tail, atol=1e-6, rtol=1e-6)
    everything = precompute_teacher(target, rows[:1], top_k=64, progress=False)
    assert set(everything[0]["teacher_tail_logprob"]) == {-1e4}  # nothing cut: an empty tail, not rounding noise
    states = torch.cat([outputs.hidden_states[1][0], outputs.hidden_states[3][0]], dim=-1)
    torch.testing.assert_close(batch["teacher_states"][0], states, atol=0.05, rtol=0.01)
    assert batch["labels"][1].tolist() == [7, 8, 9, -100, -100]  # no labels: every token trained; padding not


def test_sparse_kl_is_exact_when_nothing_is_cut_and_a_lower_bound_otherwise():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 32, generator=generator)
    student = torch.randn(4, 32, generator=generator, requires_grad=True)
    log_p = teacher.log_softmax(-1)
    full = F.kl_div(student.log_softmax(-1), log_p, log_target=True, reduction="none").sum(-1)
    everything = log_p.topk(32, dim=-1)
    sparse = sparse_forward_kl(student, everything.indices, everything.values, torch.full((4,), -1e4))
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
    (full_grad,) = torch.autograd.grad(full.sum(), student)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), student)
    torch.testing.assert_close(sparse_grad, full_grad, atol=1e-5, rtol=1e-5)
    top = log_p.topk(6, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    cut = sparse_forward_kl(student, top.indices, top.values, tail)
    assert bool((cut <= full + 1e-6).all()) and bool((cut > 0).all())


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_over_a_sub_vocabulary_nothing_cut_gives_the_online_divergence(divergence):
    """A student over 12 of 32 ids: the online divergence renormalises the teacher over them; the coarse one drops
    the kept ids outside them and renormalises over the rest — the same, gradients included, when every id is
    kept."""
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(5, 32, generator=generator) * 3
    vocabulary = torch.randperm(32, generator=generator)[:12].sort().values
    student = torch.randn(5, 12, generator=generator, requires_grad=True)
    fn = DIVERGENCES[divergence]
    online = fn(student, teacher[:, vocabulary], 1.0)
    everything = teacher.log_softmax(-1).topk(32, dim=-1)
    in_vocabulary = torch.zeros(32, dtype=torch.bool).index_fill(0, vocabulary, True)
    student_ids = in_vocabulary.cumsum(0) - 1
    coarse_teacher, coarse_student = coarse_log_probs(student, student_ids[everything.indices], everything.values,
                                                      torch.full((5,), -1e4), in_vocabulary[everything.indices])
    offline = fn(coarse_student, coarse_teacher, 1.0)
    torch.testing.assert_close(offline, online, atol=1e-5, rtol=1e-5)
    (online_grad,) = torch.autograd.grad(online.sum(), student)
    (offline_grad,) = torch.autograd.grad(offline.sum(), student)
    torch.testing.assert_close(offline_grad, online_grad, atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(offline_grad).all())


def test_recipe_writes_train_and_eval_teacher_datasets(tmp_path):
    import sys
    from pathlib import Path

    from datasets import load_from_disk

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    import offline_teacher
    from transformers import AutoModelForCausalLM

    from trainers.offline import TargetParts, TeacherMetadata

    offline_teacher.main(["--tiny", "true", "--tiny_train_rows", "16", "--tiny_eval_rows", "8", "--tiny_target_steps",
                          "2", "--output_dir", str(tmp_path), "--top_k", "4", "--state_layers", "1", "3"])
    train = load_from_disk(str(tmp_path / "train"))
    assert len(train) == 16 and len(load_from_disk(str(tmp_path / "eval"))) == 8
    assert len(train[0]["teacher_top_ids"][0]) == 4 and len(train[0]["teacher_states"][0]) == 2 * 64
    metadata = TeacherMetadata.load(str(tmp_path))
    assert metadata.state_layers == [1, 3] and metadata.teacher == str(tmp_path / "tiny-target")
    target = AutoModelForCausalLM.from_pretrained(metadata.teacher)  # the tiny target it was stored from
    parts = TargetParts.load(str(tmp_path / metadata.target_parts))  # what a drafter needs of it, without it
    same = [config.to_dict() | {"_name_or_path": None} for config in (parts.config, target.config)]
    assert same[0] == same[1]
    assert parts.generation_config.eos_token_id == target.generation_config.eos_token_id
    assert torch.equal(parts.embedding.weight, target.get_input_embeddings().weight)
    assert not parts.embedding.weight.requires_grad
