"""RoutedDrafter: rows drafted by different drafters (and moved between them) are verified together, exactly."""

import json

import pytest
import torch
from conftest import SplitRouter, left_padded_batch, perturbed_copy, rotating_routed_drafter, tiny_model

from hf_specdec import ModelDrafter, NGramDrafter, OnlinePolicy, RoutedDrafter, SortedDrafter, TreeConfig
from hf_specdec.draft import Draft
from hf_specdec.drafters.routed import merge_drafts
from hf_specdec.routing.policy import RowBandits

UNEVEN = [7, 3, 9, 5, 1]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=3)
    return target, perturbed_copy(target, noise=0.1)


def arms(draft, kind):
    return {
        "chain+ngram": lambda: {"a": ModelDrafter(draft, num_draft_tokens=4), "b": NGramDrafter(3, num_draft_tokens=3)},
        "chain+tree": lambda: {"a": ModelDrafter(draft, num_draft_tokens=3),
                               "b": ModelDrafter(draft, tree=TreeConfig(depth=4, top_k=2, max_nodes=8))},
        "sorted+ngram-tree": lambda: {"a": SortedDrafter(draft, exits=[1, 2], thresholds=[0.1], num_draft_tokens=4),
                                      "b": NGramDrafter(2, tree=TreeConfig(depth=3, top_k=2, max_nodes=6))},
    }[kind]()


def assert_same_as_plain(target, drafter, batch, **kwargs):
    plain = target.generate(**batch, do_sample=False, **kwargs)
    ours = target.generate(**batch, do_sample=False, assistant_model=drafter, return_dict_in_generate=True, **kwargs)
    assert torch.equal(ours.sequences, plain), f"\nplain {plain.tolist()}\nours  {ours.sequences.tolist()}"
    return ours


@pytest.mark.parametrize("kind", ["chain+ngram", "chain+tree", "sorted+ngram-tree"])
@pytest.mark.parametrize("routing", ["router", "rotating"])
@pytest.mark.parametrize("lengths", [[6], UNEVEN], ids=["batch1", "batch5"])
def test_greedy_equals_plain(pair, kind, routing, lengths):
    target, draft = pair
    batch = left_padded_batch(96, lengths, seed=4)
    drafter = RoutedDrafter(arms(draft, kind), router=SplitRouter()) if routing == "router" else \
        rotating_routed_drafter(arms(draft, kind))
    out = assert_same_as_plain(target, drafter, batch, max_new_tokens=24)
    per_drafter = out.spec_stats.per_drafter
    assert sum(per_drafter[name]["rows"] for name in ("a", "b")) == len(lengths)
    if routing == "router" and len(lengths) > 1:
        assert set(drafter.last_choice) == {"a", "b"}  # the batch really mixed drafters
    if routing == "rotating":
        assert per_drafter["none"]["tau"] == 1.0 and per_drafter["a"]["rounds"] and per_drafter["b"]["rounds"]
    # per-drafter rounds add up to the call's row-rounds
    assert sum(stats["rounds"] for name, stats in per_drafter.items() if name != "switches") == \
        int(out.spec_stats.rounds.sum())


def test_switching_keeps_every_cache_in_step(pair):
    """Two copies of one drafter, rows moving between them every round: if a cache missed any committed token,
    its drafts (and so the acceptance counts) would differ from one drafter that never switches."""
    target, draft = pair
    batch = left_padded_batch(96, UNEVEN, seed=9)
    for make in (lambda: ModelDrafter(draft, num_draft_tokens=4),
                 lambda: ModelDrafter(draft, tree=TreeConfig(depth=3, top_k=2, max_nodes=6)),
                 lambda: SortedDrafter(draft, exits=[1, 2], thresholds=[0.2], num_draft_tokens=4)):
        single = assert_same_as_plain(target, make(), batch, max_new_tokens=30).spec_stats
        routed = rotating_routed_drafter({"a": make(), "b": make(), "c": make()}, include_no_draft=False)
        switched = assert_same_as_plain(target, routed, batch, max_new_tokens=30).spec_stats
        assert torch.equal(switched.accepted, single.accepted) and torch.equal(switched.rounds, single.rounds)


def test_online_policy_is_exact_and_leaves_a_useless_drafter(pair):
    """A drafter that drafts nothing useful (a random model) next to a good one: the policy moves rows off it."""
    target, draft = pair
    useless = tiny_model("llama", seed=11)
    batch = left_padded_batch(96, UNEVEN, seed=5)
    routed = RoutedDrafter({"bad": ModelDrafter(useless, num_draft_tokens=4), "good": ModelDrafter(draft, 4)},
                           policy=OnlinePolicy(check_every=2, trial_rounds=2, draft_costs={"bad": 0.1, "good": 0.1}))
    out = assert_same_as_plain(target, routed, batch, max_new_tokens=40)
    stats = out.spec_stats.per_drafter
    assert routed.last_choice == ["bad"] * 5  # no router: the default (first) drafter
    assert stats["switches"] >= 5 and stats["good"]["rounds"] > stats["bad"]["rounds"]


def test_sampling_rows_from_both_drafters_share_one_draft():
    """Merging a sampled chain (q = the draft's distribution) with n-gram rows (q one-hot) keeps each row's own q."""
    chain = Draft.chain(torch.tensor([[4, 5], [6, 7]]), probs=torch.softmax(torch.randn(2, 2, 10), -1))
    lookup = Draft.chain(torch.tensor([[1, 2, 3], [8, 9, 1]]))
    merged = merge_drafts({0: chain, 1: lookup}, torch.tensor([0, 1]), 2, 10, True, "cpu")
    assert merged.is_chain and merged.num_nodes == 3
    assert merged.tokens.tolist() == [[4, 5, 0], [8, 9, 1]]
    assert merged.valid.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(merged.probs[0, :2], chain.probs[0])
    assert torch.equal(merged.probs[1], torch.nn.functional.one_hot(torch.tensor([8, 9, 1]), 10).float())


@pytest.mark.parametrize("true_tau", [[1.5, 3.0, 2.0, 1.2], [3.0, 2.8], [2.8, 3.0], [1.1, 1.2, 1.3]])
@pytest.mark.parametrize("check_every,trial_rounds", [(2, 4), (4, 4), (1, 3)])
def test_policy_exploration_is_bounded(true_tau, check_every, trial_rounds):
    """Without a router every drafter is tried once per row (optimistic prior), each trial lasts `trial_rounds`
    rounds, then the row settles on its best arm (drafting alone when none pays): rounds on worse arms never exceed
    the documented bound, whatever arm the row starts on, and a trial's drafter never holds on by the margin."""
    policy = OnlinePolicy(check_every=check_every, trial_rounds=trial_rounds)
    arms = len(true_tau)
    values = [*true_tau, 1.0]  # no drafting: τ 1 at cost 1 (the drafters here cost nothing)
    best = max(range(arms + 1), key=values.__getitem__)
    for start in range(arms):
        bandits = RowBandits(policy, torch.tensor([start]), torch.full((1, arms), 6.0), torch.zeros(arms))
        worse_rounds = 0
        for _ in range(300):
            arm = int(bandits.assignment[0])
            tokens, rounds = torch.zeros(1, arms + 1), torch.zeros(1, arms + 1)
            tokens[0, arm], rounds[0, arm] = values[arm] * check_every, check_every
            worse_rounds += check_every * (arm != best)
            bandits.observe(tokens, rounds)
        assert int(bandits.assignment[0]) == best
        assert worse_rounds <= policy.exploration_bound(arms), (start, worse_rounds)


def test_policy_stops_drafting_when_nothing_pays():
    """τ 1.2 at cost 1.5 is worth 0.8 of decoding alone: after its first drafter's trial (8 rounds) the row stops
    drafting; a row at τ 3 keeps its drafter; a row with no rounds (finished) leaves every drafter at once."""
    policy = OnlinePolicy(check_every=4, trial_rounds=8, explore=False)
    bandits = RowBandits(policy, torch.zeros(3, dtype=torch.long), torch.full((3, 1), 3.0), torch.tensor([0.5]))
    choices = [bandits.observe(torch.tensor([[4.8, 0.0], [12.0, 0.0], [0.0, 0.0]]),
                               torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 0.0]])).tolist() for _ in range(3)]
    assert choices == [[0, 0, 1], [1, 0, 1], [1, 0, 1]]


def test_from_pretrained_reads_routing_json(pair, tmp_path):
    target, draft = pair
    draft.save_pretrained(tmp_path / "code")
    (tmp_path / "routed").mkdir()
    (tmp_path / "routed" / "routing.json").write_text(json.dumps({
        "drafters": {"code": {"kind": "checkpoint", "path": "../code"}, "lookup": {"kind": "ngram", "max_ngram": 2}},
        "router": None, "default": "lookup"}))
    routed = RoutedDrafter.from_pretrained(tmp_path / "routed", num_draft_tokens=3)
    assert routed.names == ["code", "lookup"] and routed.default == 1
    assert isinstance(routed.drafters[0], ModelDrafter) and routed.drafters[0].num_draft_tokens == 3
    assert_same_as_plain(target, routed, left_padded_batch(96, [5, 8], seed=1), max_new_tokens=12)
    with pytest.raises(ValueError, match="routing.json"):
        RoutedDrafter.from_pretrained(tmp_path)


def test_bad_configurations_are_refused(pair):
    _, draft = pair
    with pytest.raises(TypeError, match="non-empty dict"):
        RoutedDrafter({})
    with pytest.raises(TypeError, match="must be an hf_specdec Drafter"):
        RoutedDrafter({"a": draft})
    with pytest.raises(ValueError, match="schedule='auto'"):
        RoutedDrafter({"a": ModelDrafter(draft, schedule="auto")})
    with pytest.raises(ValueError, match="other than 'none'"):
        RoutedDrafter({"none": ModelDrafter(draft)})
    with pytest.raises(ValueError, match="has no"):
        RoutedDrafter({"a": ModelDrafter(draft)}, router=SplitRouter(names=("a", "c")))


def test_suite_routing_experiments_on_a_lab_layout(tmp_path):
    """specialized_drafts and adaptive_routing rows (offline router, router + policy, policy alone, oracle) on a
    lab-style folder with a routing folder beside it; every greedy row equals plain."""
    from hf_specdec import testing
    from hf_specdec.bench import SuiteConfig, run_suite
    from hf_specdec.routing import train_router

    target = testing.tiny_causal_lm("llama", vocab_size=512, num_layers=3, seed=0)
    target.save_pretrained(tmp_path / "lab" / "target")
    for name, seed in (("code", 1), ("prose", 2)):
        testing.tiny_causal_lm("llama", vocab_size=512, num_layers=1, seed=seed).save_pretrained(
            tmp_path / "lab" / "drafters" / name)
    router = train_router(torch.randn(8, target.config.hidden_size), torch.rand(8, 3) + 1, feature_layer=2,
                          drafter_names=["code", "prose", "lookup"], epochs=5)
    router.save_pretrained(tmp_path / "routing" / "router")
    (tmp_path / "routing" / "routing.json").write_text(json.dumps({"router": "router", "drafters": {
        "code": {"kind": "checkpoint", "path": "../lab/drafters/code"},
        "prose": {"kind": "checkpoint", "path": "../lab/drafters/prose"}, "lookup": {"kind": "ngram"}}}))
    config = SuiteConfig.quick(lab=str(tmp_path / "lab"), routing=str(tmp_path / "routing"), prompts=("qa", "code"),
                               experiments=("plain", "specialized_drafts", "adaptive_routing"), max_new_tokens=8)
    (pair,) = run_suite(config, show_progress=False)["pairs"]
    rows = {row["name"]: row for row in pair["rows"]}
    assert set(rows) == {"plain", "specialized_drafts[code]", "specialized_drafts[prose]", "specialized_drafts[lookup]",
                         "routed (offline router)", "routed (router + online policy)", "routed (online policy alone)",
                         "oracle (best τ per prompt)"}
    assert all(row["overall"]["equal_to_plain"] for name, row in rows.items() if name != "plain")
    singles = [rows[f"specialized_drafts[{name}]"]["overall"]["mean_accepted_length"] for name in ("code", "prose", "lookup")]
    assert rows["oracle (best τ per prompt)"]["overall"]["mean_accepted_length"] >= min(singles)
    assert set(rows["oracle (best τ per prompt)"]["categories"]) == {"qa", "code"}
