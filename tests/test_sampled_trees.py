"""Sampled trees (TreeConfig(sampling="recursive"), the default under do_sample): construction and speed.

Exactness end to end is in tests/test_sampling_lossless.py (every drafter with distributions, with batches),
with negative controls: a variant that forgets to remove earlier siblings from q, and one that keeps a sibling
by its own probability, both fail the exact-distribution check. Here: one verification round over 200k
independent rows against tables (no model), including the float edge cases a review found.
"""

import pytest
import torch
from conftest import perturbed_copy, siblings_verified_against_q, tiny_model

from hf_specdec import ModelDrafter, TreeConfig
from hf_specdec.drafters.trees import SampledCandidates, SiblingAcceptance

VOCAB = 32


def grow(log_q_for_level, depth=4, top_k=3, max_nodes=9, coverage=0.9, batch_size=2):
    """Run the level loop of ModelDrafter._propose_tree with given draft distributions (no model)."""
    torch.manual_seed(0)
    capacity = top_k + (depth - 1) * top_k * top_k
    buffers = SampledCandidates(batch_size, capacity, depth, "cpu", coverage,
                                SiblingAcceptance(top_k, "cpu").log_reach_by_rank())
    frontier = buffers.add_children(log_q_for_level(1)[:, :1], parents=None, top_k=top_k)
    for level in range(1, depth):
        children = buffers.add_children(log_q_for_level(level + 1)[:, : frontier.shape[1]], frontier, top_k)
        frontier = buffers.best(children, top_k)
    return buffers.select(max_nodes, top_k)


def peaked(level, batch_size=2, frontier=3):
    logits = torch.zeros(batch_size, frontier, VOCAB)
    logits[..., (7 * level) % VOCAB] = 20.0  # q puts ~all its mass on one token
    return logits.log_softmax(-1)


def flat(level, batch_size=2, frontier=3):
    return torch.zeros(batch_size, frontier, VOCAB).log_softmax(-1)


def test_a_confident_drafter_drafts_a_chain():
    draft, _ = grow(peaked)
    assert draft.valid.sum(-1).tolist() == [4, 4]  # one child per level: the spine
    depths = draft.depths()[draft.valid].view(2, 4)
    assert depths.tolist() == [[1, 2, 3, 4]] * 2


def test_an_unsure_drafter_branches_within_the_budget_and_keeps_the_spine():
    draft, chosen = grow(flat)
    assert draft.valid.sum(-1).tolist() == [9, 9]  # the whole budget
    depths = draft.depths()
    for row in range(2):
        valid_depths = depths[row][draft.valid[row]]
        assert set(valid_depths.tolist()) == {1, 2, 3, 4}  # the spine reaches the full depth
        assert (valid_depths[:-1] <= valid_depths[1:]).all()  # topological: levels in order
    assert (draft.valid.sum(-1) <= 9).all()


def test_siblings_are_a_prefix_of_the_draw_order_with_their_exact_distributions():
    draft, chosen = grow(flat)
    q = torch.full((VOCAB,), 1.0 / VOCAB)
    for row in range(2):
        for parent in [-1] + list(range(draft.num_nodes)):
            children = [i for i in range(draft.num_nodes) if draft.valid[row, i] and draft.parents[row, i] == parent]
            tokens = draft.tokens[row, children].tolist()
            assert len(set(tokens)) == len(tokens)  # drawn without replacement
            for j, child in enumerate(children):
                expected = q.clone()
                expected[tokens[:j]] = 0  # q without the earlier siblings, renormalised
                torch.testing.assert_close(draft.probs[row, child], expected / expected.sum())


def test_a_later_sibling_never_outranks_an_earlier_one():
    """Kept siblings must be a prefix of the draw order, even when rank 1 is measured to accept more than rank 0."""
    acceptance = SiblingAcceptance(3, "cpu")
    acceptance.accepted = torch.tensor([0.5, 3.6, 2.0])  # rates 0.125, 0.9, 0.5 over 4 pseudo-rounds
    reach = acceptance.log_reach_by_rank()
    assert (reach[1:] <= reach[:-1]).all()


def test_sibling_acceptance_counts_what_the_walk_tried():
    """Root with children of ranks 0, 1 (nodes 0, 1); node 1 has children of ranks 0, 1 (nodes 2, 3).
    Row 0 accepted node 1 then node 2 (a leaf): rank 0 tried twice, accepted once; rank 1 tried and accepted once.
    Row 1 accepted nothing: both root children tried and refused."""
    from hf_specdec.draft import Draft

    acceptance = SiblingAcceptance(2, "cpu")
    acceptance.tried.zero_()
    acceptance.accepted.zero_()
    parents = torch.tensor([[-1, -1, 1, 1]] * 2)
    draft = Draft(tokens=torch.zeros(2, 4, dtype=torch.long), parents=parents, valid=torch.ones(2, 4, dtype=torch.bool),
                  max_depth=2, max_children=2)
    ranks = torch.tensor([[0, 1, 0, 1]] * 2)
    path = torch.tensor([[1, 2], [-1, -1]])
    acceptance.record(draft, ranks, path, torch.tensor([2, 0]))
    assert acceptance.tried.tolist() == [3, 2] and acceptance.accepted.tolist() == [1, 1]


def test_coverage_sets_how_many_children_a_node_wants():
    two_tokens = lambda level: torch.tensor([0.0, 0.0] + [-30.0] * (VOCAB - 2)).log_softmax(-1).expand(2, 3, -1)
    draft, _ = grow(two_tokens, depth=1, top_k=3, max_nodes=3, coverage=0.9)
    assert draft.valid.sum(-1).tolist() == [2, 2]  # two tokens hold all the mass: a third child is never drawn
    draft, _ = grow(two_tokens, depth=1, top_k=3, max_nodes=3, coverage=0.4)
    assert draft.valid.sum(-1).tolist() == [1, 1]  # the first token already covers 0.4


def test_tree_config_validates_the_rule():
    with pytest.raises(ValueError, match="sampling"):
        TreeConfig(sampling="gumbel")
    with pytest.raises(ValueError, match="coverage"):
        TreeConfig(coverage=0.0)
    with pytest.raises(ValueError, match="sibling_temperature"):
        TreeConfig(sibling_temperature=0.0)


@pytest.fixture(scope="module")
def flat_pair():
    """The flat-distribution case of the issue: target max probability well under 0.05, a near-copy draft."""
    target = tiny_model("qwen2", vocab_size=128, num_layers=2, hidden_size=32, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.02)
    return target, perturbed_copy(target, noise=0.02, seed=4)


def mean_tau(target, drafter, temperature, top_p):
    ids = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                          top_p=top_p, max_new_tokens=48, assistant_model=drafter, return_dict_in_generate=True,
                          pad_token_id=0)
    return out.spec_stats.mean_accepted_length


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_a_sampled_tree_accepts_at_least_the_chain_it_contains(flat_pair, temperature, top_p):
    target, draft = flat_pair
    chain = mean_tau(target, ModelDrafter(draft, num_draft_tokens=5), temperature, top_p)
    tree = mean_tau(target, ModelDrafter(draft, tree=TreeConfig(depth=5, top_k=4, max_nodes=24)), temperature, top_p)
    top_k = mean_tau(target, ModelDrafter(draft, tree=TreeConfig(5, 4, 24, sampling="top_k")), temperature, top_p)
    assert chain > 4.5  # the draft matches the flat target: a sampled chain is accepted almost always
    assert tree >= 0.95 * chain, (tree, chain)
    assert top_k < 2.0 < tree  # deterministic children of a flat target are refused


def random_tables(vocab=5, seed=0):
    """p1 [V], p2 [V, V] (the target after each first token) and log q1, log q2 alike for the draft."""
    generator = torch.Generator().manual_seed(seed)
    p1 = torch.rand(vocab, generator=generator)
    p2 = torch.rand(vocab, vocab, generator=generator) ** 3
    q1 = torch.rand(vocab, generator=generator) ** 2
    q2 = torch.rand(vocab, vocab, generator=generator) ** 2
    return p1 / p1.sum(), p2 / p2.sum(-1, keepdim=True), q1.log().log_softmax(-1), q2.log().log_softmax(-1)


def verify_rows(tables, rows=200_000, top_k=3, max_nodes=6, coverage=0.95, seed=0, sibling_temperature=1.0):
    """One round of a depth-2 sampled tree for `rows` independent rows against fixed target/draft tables:
    returns (first token, second token or -1, draft). No model: the drafter and the target are tables."""
    from hf_specdec.verify import verify

    p1, p2, log_q1, log_q2 = tables
    torch.manual_seed(seed)
    capacity = top_k + top_k * top_k
    buffers = SampledCandidates(rows, capacity, 2, "cpu", coverage, SiblingAcceptance(top_k, "cpu").log_reach_by_rank(),
                                sibling_temperature=sibling_temperature)
    frontier = buffers.add_children(log_q1.expand(rows, 1, -1), parents=None, top_k=top_k)
    children = buffers.add_children(log_q2[buffers.tokens.gather(1, frontier)], frontier, top_k)
    buffers.best(children, top_k)
    draft, _ = buffers.select(max_nodes, top_k)
    processed = torch.cat([p1.expand(rows, 1, -1), p2[draft.tokens]], dim=1).log()
    verdict = verify(processed, draft, do_sample=True)
    node_token = lambda depth: draft.tokens.gather(1, verdict.path[:, depth:depth + 1].clamp(min=0))[:, 0]
    first = torch.where(verdict.num_accepted >= 1, node_token(0), verdict.next_token)
    second = torch.where(verdict.num_accepted >= 2, node_token(1),
                         torch.where(verdict.num_accepted == 1, verdict.next_token, -1))
    return first, second, draft


def worst_z(samples, probs):
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected).abs() / (expected * (1 - probs.double())).sqrt().clamp(min=1e-9)).max())


def worst_deviation(first, second, p1, p2, min_count=1000):
    """Largest z over the first token's distribution and each well-populated conditional of the second."""
    worst = worst_z(first, p1)
    for token in range(len(p1)):
        given = second[(first == token) & (second >= 0)]
        if len(given) >= min_count:
            worst = max(worst, worst_z(given, p2[token]))
    return worst


@pytest.mark.parametrize("sibling_temperature", [1.0, 0.5, 2.0])
def test_one_round_emits_the_targets_distribution_at_both_depths(sibling_temperature):
    """200k independent rows of one verification round: the first token follows p1 and, given an accepted first
    draft token x, the second follows p2[x] (4.5 standard errors; a 2% bias on these counts is ~9), whatever
    temperature the later siblings are drawn at."""
    tables = random_tables()
    first, second, draft = verify_rows(tables, sibling_temperature=sibling_temperature)
    assert draft.valid.sum(-1).float().mean() > 3  # siblings are drafted (coverage 0.95 on flat-ish q)
    assert worst_deviation(first, second, tables[0], tables[1]) < 4.5


def test_one_round_check_catches_siblings_verified_against_the_wrong_q(monkeypatch):
    """The same check fails when earlier siblings are left in q (siblings treated as drawn with replacement)."""
    def parent_q(self, chosen, top_k):
        q = torch.cat(self.parent_log_q, dim=1).exp()
        return q.gather(1, self.q_slot.gather(1, chosen)[..., None].expand(-1, -1, q.shape[-1]))

    monkeypatch.setattr(SampledCandidates, "_sibling_distributions", parent_q)
    tables = random_tables()
    first, second, _ = verify_rows(tables)
    assert worst_deviation(first, second, tables[0], tables[1]) > 4.5


def test_one_round_check_catches_sharpened_siblings_verified_against_q(monkeypatch):
    """Siblings drawn from a sharpened q but verified against q itself (not what they were drawn from) fail the
    same check."""
    monkeypatch.setattr(SampledCandidates, "_sibling_distributions",
                        siblings_verified_against_q(SampledCandidates._sibling_distributions))
    tables = random_tables()
    first, second, _ = verify_rows(tables, sibling_temperature=0.5)
    assert worst_deviation(first, second, tables[0], tables[1]) > 4.5


def test_sharpened_siblings_are_distinct_and_drawn_from_the_support():
    """A two-token q with top_k=4: the first child and one sibling, never a repeat or a zero-probability token."""
    log_q = torch.full((64, 1, VOCAB), float("-inf"))
    log_q[..., 3], log_q[..., 5] = -0.1, -2.0
    log_q = log_q.log_softmax(-1)
    buffers = SampledCandidates(64, 4, 1, "cpu", 1.0, SiblingAcceptance(4, "cpu").log_reach_by_rank(),
                                sibling_temperature=0.3)
    buffers.add_children(log_q, parents=None, top_k=4)
    draft, _ = buffers.select(4, 4)
    assert draft.valid.sum(-1).tolist() == [2] * 64
    tokens = draft.tokens.masked_fill(~draft.valid, -1).sort(-1).values[:, -2:]
    assert tokens.tolist() == [[3, 5]] * 64
    second = draft.probs[:, 1]  # the sibling after token x was drawn from the sharpened q without x: one-hot
    assert torch.allclose(second.max(-1).values, torch.ones(64))


def test_budget_ties_between_nodes_do_not_depend_on_a_siblings_own_value():
    """Equal parents with the same draft row tie at the level budget; the tie must not be broken by rounding
    that reads a sibling's own probability (an inclusive running sum minus the sibling did, |z| ~ 15 here)."""
    vocab = 5
    log_q2 = torch.tensor([1.5858908891677856, -0.39642223715782166, 0.26118025183677673, -0.6243966817855835,
                           -1.0563753843307495]).log_softmax(-1).expand(vocab, vocab)
    p2 = torch.tensor([0.02, 0.5, 0.16, 0.16, 0.16]).expand(vocab, vocab)
    tables = (torch.full((vocab,), 1 / vocab), p2, torch.zeros(vocab).log_softmax(-1), log_q2)
    first, second, _ = verify_rows(tables, max_nodes=7)
    assert worst_z(second[second >= 0], p2[0]) < 4.5


def test_a_sibling_drawn_from_an_underflowing_tail_is_verified_against_its_true_q():
    """coverage=1.0 on a very peaked draft: the third sibling comes from a tail whose probabilities underflow to 0
    in float32; its q must still be the renormalised tail, not zeros (which would accept it whenever p > 0)."""
    vocab = 5
    log_q1 = torch.tensor([0.0, -0.2, -120.0, -121.0, -122.0]).log_softmax(-1)
    p1 = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5])
    tables = (p1, torch.full((vocab, vocab), 1 / vocab), log_q1, torch.zeros(vocab, vocab).log_softmax(-1))
    first, _, _ = verify_rows(tables, top_k=3, max_nodes=6, coverage=1.0)
    assert worst_z(first, p1) < 4.5


@pytest.mark.parametrize("level_major,biased", [(False, True), (True, False)])
def test_a_gate_reading_the_whole_level_needs_level_major_ranking(level_major, biased):
    """A sorted drafter picks one exit per level from the level's most confident node, so a node's q depends on
    its parent's siblings. Ranked by reach across levels, a deeper node (whose candidacy then depends on sibling
    j's own token) can outrank sibling j: biased (|z| ~ 30 here). Ranked level by level: exact."""
    vocab, top_k, rows = 6, 3, 400_000

    def norm(values):
        values = torch.tensor(values, dtype=torch.float)
        return values / values.sum()

    q1 = norm([0.25, 0.25, 0.25, 0.25 - 2e-3, 1e-3, 1e-3])
    p1 = norm([0.50, 0.05, 0.05, 0.05, 0.175, 0.175])
    confident_exit = torch.stack([norm([0.99] + [0.002] * 5)] + [norm([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])] * 5)
    last_exit = torch.stack([norm([0.01] * t + [0.99] + [0.01] * (vocab - 1 - t)) for t in range(vocab)])
    torch.manual_seed(0)
    acceptance = SiblingAcceptance(top_k, "cpu")
    acceptance.accepted = torch.tensor([0.9, 0.5, 0.5]) * acceptance.tried  # rates measured on an earlier call
    buffers = SampledCandidates(rows, top_k + top_k * top_k, 2, "cpu", 0.95, acceptance.log_reach_by_rank(),
                                level_major=level_major)
    frontier = buffers.add_children(q1.log().expand(rows, 1, -1), parents=None, top_k=top_k)
    tokens = buffers.tokens.gather(1, frontier)
    confident = confident_exit[tokens].amax(-1).amax(-1) >= 0.5  # the gate: the level's most confident node
    q2 = torch.where(confident[:, None, None], confident_exit[tokens], last_exit[tokens])
    buffers.best(buffers.add_children(q2.log(), frontier, top_k), top_k)
    draft, _ = buffers.select(5, top_k)
    from hf_specdec.verify import verify

    processed = torch.cat([p1.expand(rows, 1, -1), torch.full((rows, draft.num_nodes, vocab), 1 / vocab)], 1).log()
    verdict = verify(processed, draft, do_sample=True)
    first_node = draft.tokens.gather(1, verdict.path[:, :1].clamp(min=0))[:, 0]
    first = torch.where(verdict.num_accepted >= 1, first_node, verdict.next_token)
    assert (worst_z(first, p1) > 4.5) == biased
