"""Offline teachers: stored top-k log-probabilities, tail mass and states are the target's, and the sparse
divergence is exact for what it keeps (equal to the full one, gradients included, when nothing is cut)."""

import torch
from torch.nn import functional as F

from hf_specdec.testing import tiny_causal_lm
from trainers.offline import (OfflineTeacherCollator, from_bf16_bits, precompute_teacher, sparse_forward_kl,
                              to_bf16_bits)


def test_bf16_bits_round_trip():
    values = torch.randn(5, 7) * 100
    assert torch.equal(from_bf16_bits(to_bf16_bits(values).tolist()), values.to(torch.bfloat16).float())


def test_precomputed_rows_hold_the_targets_outputs():
    target = tiny_causal_lm(vocab_size=64, num_layers=3, seed=1)
    rows = [{"input_ids": [5, 9, 11, 30, 2], "labels": [-100, 9, 11, 30, 2]}, {"input_ids": [7, 8, 9]}]
    data = precompute_teacher(target, rows, top_k=8, state_layers=[1, 3], batch_size=2, progress=False)
    batch = OfflineTeacherCollator(pad_token_id=0)([data[0], data[1]])
    assert batch["teacher_top_ids"].shape == (2, 5, 8) and batch["teacher_states"].shape == (2, 5, 2 * 64)
    with torch.no_grad():
        outputs = target(torch.tensor([rows[0]["input_ids"]]), output_hidden_states=True)
    log_p = outputs.logits[0].log_softmax(-1)
    top = log_p.topk(8, dim=-1)
    assert torch.equal(batch["teacher_top_ids"][0], top.indices)
    torch.testing.assert_close(batch["teacher_top_logprobs"][0], top.values, atol=0.05, rtol=0.01)  # bf16
    tail = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(batch["teacher_tail_logprob"][0], tail, atol=1e-5, rtol=1e-5)
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


def test_recipe_writes_train_and_eval_teacher_datasets(tmp_path):
    import sys
    from pathlib import Path

    from datasets import load_from_disk

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    import offline_teacher

    from trainers.offline import TeacherMetadata

    offline_teacher.main(["--tiny", "true", "--tiny_train_rows", "16", "--tiny_eval_rows", "8", "--tiny_target_steps",
                          "2", "--output_dir", str(tmp_path), "--top_k", "4", "--state_layers", "1", "3"])
    train = load_from_disk(str(tmp_path / "train"))
    assert len(train) == 16 and len(load_from_disk(str(tmp_path / "eval"))) == 8
    assert len(train[0]["teacher_top_ids"][0]) == 4 and len(train[0]["teacher_states"][0]) == 2 * 64
    assert TeacherMetadata.load(str(tmp_path)).state_layers == [1, 3]
