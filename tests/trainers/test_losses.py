"""Each divergence against a hand computation, including zero-probability entries; the normaliser."""

import math

import pytest
import torch

from trainers.losses import (
    LOG_PROB_FLOOR,
    expected_acceptance,
    forward_kl,
    generalized_jsd,
    get_divergence,
    normalize_token_loss,
    reverse_kl,
    shared_vocab,
    supervised_positions,
    token_cross_entropy,
    top1_agreement,
    total_variation,
)

# Teacher p has a zero (a top-k / top-p target); student q is uniform.
P = [0.5, 0.25, 0.25, 0.0]
Q = [0.25, 0.25, 0.25, 0.25]


def logits_of(probs):
    return torch.tensor([[math.log(x) if x > 0 else float("-inf") for x in probs]])


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def test_forward_kl_by_hand():
    value = forward_kl(logits_of(Q), logits_of(P))
    assert value.item() == pytest.approx(kl(P, Q)) == pytest.approx(0.5 * math.log(2))


def test_reverse_kl_is_finite_against_a_sparse_teacher():
    value = reverse_kl(logits_of(Q), logits_of(P))
    # Exact reverse KL is infinite (q has mass where p has none); the floored log-probability makes the hole cost
    # q · (log q − floor) instead, and every other token is the exact term.
    expected = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(P, Q) if pi > 0)
    expected += Q[3] * (math.log(Q[3]) - LOG_PROB_FLOOR)
    assert torch.isfinite(value).all()
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_by_hand_with_full_support():
    p = [0.7, 0.2, 0.1]
    q = [0.2, 0.3, 0.5]
    assert reverse_kl(logits_of(q), logits_of(p)).item() == pytest.approx(kl(q, p), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_by_hand(beta):
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(P, Q)]
    expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
    assert generalized_jsd(logits_of(Q), logits_of(P), beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_rejects_endpoints():
    with pytest.raises(ValueError, match="forward_kl / reverse_kl"):
        generalized_jsd(logits_of(Q), logits_of(P), beta=0.0)


def test_tvd_and_expected_acceptance_by_hand():
    tvd = 0.5 * sum(abs(pi - qi) for pi, qi in zip(P, Q))
    acceptance = sum(min(pi, qi) for pi, qi in zip(P, Q))
    assert total_variation(logits_of(Q), logits_of(P)).item() == pytest.approx(tvd) == pytest.approx(0.25)
    assert expected_acceptance(logits_of(Q), logits_of(P)).item() == pytest.approx(acceptance) == pytest.approx(0.75)


def test_temperature_divides_both_models():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.softmax(teacher / 2.0, -1)[0].tolist()
    q = torch.softmax(student / 2.0, -1)[0].tolist()
    assert forward_kl(student, teacher, temperature=2.0).item() == pytest.approx(kl(p, q), rel=1e-5)


def test_top_k_sparse_targets_never_give_nan_values_or_gradients():
    torch.manual_seed(0)
    teacher = torch.randn(6, 10)
    teacher[teacher < teacher.topk(3, dim=-1).values[:, -1:]] = float("-inf")  # top-3 teacher
    teacher[0] = float("-inf")
    teacher[0, 4] = 0.0  # a one-hot (greedy) target
    for name in ["forward_kl", "reverse_kl", "jsd", "tvd"]:
        student = torch.randn(6, 10, requires_grad=True)
        values = get_divergence(name, beta=0.5)(student, teacher, 1.0)
        values.sum().backward()
        assert values.shape == (6,)
        assert torch.isfinite(values).all(), name
        assert (values >= -1e-6).all(), name
        assert torch.isfinite(student.grad).all(), name


def test_a_sparse_student_is_finite_under_forward_kl():
    student = logits_of(P)  # zero where the teacher below has mass
    teacher = logits_of(Q)
    assert torch.isfinite(forward_kl(student, teacher)).all()


def test_identical_distributions_give_zero_divergence_and_full_acceptance():
    logits = torch.randn(4, 7)
    for name in ["forward_kl", "reverse_kl", "jsd", "tvd"]:
        assert get_divergence(name)(logits, logits, 1.0).abs().max() < 1e-6
    assert torch.allclose(expected_acceptance(logits, logits), torch.ones(4))
    assert top1_agreement(logits, logits).tolist() == [1.0] * 4


def test_unknown_divergence_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        get_divergence("kl")


def test_shared_vocab_cuts_to_the_smaller_head():
    student, teacher = shared_vocab(torch.zeros(2, 5), torch.zeros(2, 8))
    assert student.shape == teacher.shape == (2, 5)


def test_cross_entropy_and_positions():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert token_cross_entropy(logits, torch.tensor([0, 1])).tolist() == pytest.approx([math.log(2), -math.log(0.1)])
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert supervised_positions(labels).tolist() == [[False, True, True], [True, True, False]]


def test_normalizer_uses_the_global_count_and_process_scale():
    per_token = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    mask = torch.tensor([True, True, True, False])
    assert normalize_token_loss(per_token, mask).item() == pytest.approx(2.0)  # local mean, masked inf ignored
    assert normalize_token_loss(per_token, mask, num_items_in_batch=12).item() == pytest.approx(0.5)
    assert normalize_token_loss(per_token, mask, num_items_in_batch=12, num_processes=2).item() == pytest.approx(1.0)
    assert normalize_token_loss(torch.tensor([2.0, 4.0])).item() == pytest.approx(3.0)


def test_forward_kl_keeps_its_gradient_where_the_student_is_nearly_certain():
    """Student logits [100, 0] against a uniform teacher: log q = -100 for the second token, below the float32
    floor. The floor used to be applied to the student's side too, which froze that entry's gradient (it came out
    [0, -3e-42]); the exact forward-KL gradient is q - p = [0.5, -0.5]."""
    student = torch.tensor([[100.0, 0.0]], requires_grad=True)
    forward_kl(student, torch.zeros(1, 2)).sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.5, -0.5]]))
