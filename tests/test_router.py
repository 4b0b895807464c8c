"""DrafterRouter: config checks, save/load (safetensors, AutoModel), predictions in real units, training on separable
features, exact routing metrics; and recipes/route.py end to end on tiny models (a lab-shaped folder and a prompts
file), resumed, with its dataset, router and routing.json."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from hf_specdec.routing import (
    DrafterRouter,
    DrafterRouterConfig,
    evaluate_router,
    prompt_features,
    routing_metrics,
    train_router,
)
from hf_specdec.testing import character_tokenizer, tiny_causal_lm

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

NAMES = ["code", "prose"]


pytestmark = pytest.mark.usefixtures("single_thread")


def separable(num_prompts: int, hidden_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clusters of features; `code` is the better arm in the first, `prose` in the second (values like τ)."""
    generator = torch.Generator().manual_seed(seed)
    domain = torch.arange(num_prompts) % 2
    centres = torch.randn(2, hidden_size, generator=generator) * 2
    features = centres[domain] + torch.randn(num_prompts, hidden_size, generator=generator) + 5.0
    difficulty = torch.rand(num_prompts, generator=generator)  # moves both arms together, as prompt difficulty does
    good, bad = 3.0 + difficulty, 1.8 + difficulty
    values = torch.stack([torch.where(domain == 0, good, bad), torch.where(domain == 0, bad, good)], 1)
    return features, values + 0.05 * torch.randn(num_prompts, 2, generator=generator)


@pytest.fixture(scope="module")
def trained():
    features, values = separable(200)
    return train_router(features[:150], values[:150], feature_layer=1, drafter_names=NAMES, epochs=150), features, \
        values


# ----- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    (dict(drafter_names=["a"]), "at least two"),
    (dict(drafter_names=["a", "a"]), "repeated"),
    (dict(objective="speed"), "objective"),
    (dict(feature_layer=-1), "feature_layer"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_fields_with_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        DrafterRouterConfig(**{"drafter_names": NAMES, "hidden_size": 8, "feature_layer": 1, **fields})
    with pytest.raises(ValueError, match="train_router"):
        DrafterRouter(DrafterRouterConfig())


def test_save_load_roundtrip_and_automodel_keep_weights_statistics_and_predictions(trained, tmp_path):
    router, features, _ = trained
    router.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hf_specdec_router"
    for loaded in (AutoModel.from_pretrained(tmp_path), DrafterRouter.from_pretrained(tmp_path)):
        assert type(loaded) is DrafterRouter and not loaded.training
        assert loaded.config.drafter_names == NAMES and loaded.config.feature_layer == 1
        original, restored = router.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys() and {"feature_mean", "value_std"} <= original.keys()
        assert all(torch.equal(original[name], restored[name]) for name in original)
        assert torch.equal(loaded.predict(features), router.predict(features))


def test_predict_takes_any_dtype_returns_real_units_and_checks_the_width(trained):
    router, features, values = trained
    predicted = router.predict(features.double())
    assert predicted.dtype == torch.float32 and predicted.shape == (200, 2)
    assert torch.allclose(router.predict(features.bfloat16()), predicted, atol=0.2)
    # real units: τ-sized numbers, not z-scores (the prompts' difficulty is unpredictable noise of ±0.5)
    assert (predicted.mean(0) - values.float().mean(0)).abs().max() < 0.1
    assert (predicted - values.float()).abs().mean() < 0.3
    chosen = router.choose(features)
    assert chosen.dtype == torch.long and torch.equal(chosen, predicted.argmax(-1))
    router.train()
    router.predict(features[:2])
    assert router.training  # predict runs in eval mode and gives the mode back
    router.eval()
    with pytest.raises(ValueError, match=r"\[batch, 16\]"):
        router.predict(features[:, :8])


def test_forward_returns_standardised_predictions_and_their_mse(trained):
    router, features, values = trained
    out = router(features[:10], labels=values[:10])
    standardised = (values[:10].float() - router.value_mean) / router.value_std
    assert torch.allclose(out.loss, torch.nn.functional.mse_loss(out.predictions, standardised))
    assert torch.allclose(out.predictions * router.value_std + router.value_mean, router.predict(features[:10]))
    with pytest.raises(ValueError, match="one column per drafter"):
        router(features[:10], labels=values[:10, :1])


def test_training_on_separable_features_routes_held_out_prompts_almost_like_the_oracle(trained):
    router, features, values = trained
    metrics = evaluate_router(router, features[150:], values[150:])
    assert metrics["accuracy"] >= 0.95 and metrics["relative_regret"] < 0.02
    assert metrics["routed_over_best_single"] > 1.15  # each single arm is bad on half of the prompts
    state = torch.random.get_rng_state()
    again = train_router(features[:150], values[:150], feature_layer=1, drafter_names=NAMES, epochs=150)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(router.state_dict().values(), again.state_dict().values()))


def test_routing_metrics_on_hand_made_values():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0], [4.0, 0.0]])
    metrics = routing_metrics(torch.tensor([1, 0, 1, 0]), values, NAMES)  # right, tie, wrong, right
    assert metrics["accuracy"] == 0.75 and metrics["all_arms_tied"] == 0.25
    assert metrics["routed"] == 2.5 and metrics["oracle"] == 3.5 and metrics["regret"] == 1.0
    assert metrics["single_arms"] == {"code": 3.0, "prose": 1.5} and metrics["best_single_arm"] == "code"
    assert metrics["relative_regret"] == pytest.approx(1 / 3.5)
    assert metrics["routed_over_oracle"] == pytest.approx(2.5 / 3.5)
    assert metrics["routed_over_best_single"] == pytest.approx(2.5 / 3.0)
    assert metrics["chosen_counts"] == {"code": 2, "prose": 2} and metrics["prompts"] == 4


def test_evaluate_router_scores_the_routers_own_choices():
    # A hand-set router that picks the arm whose one-hot feature is on: 10 → GELU(10) ≈ 10, 0 → 0.
    router = DrafterRouter(DrafterRouterConfig(drafter_names=["a", "b", "c"], hidden_size=3, feature_layer=0,
                                               mlp_hidden_size=3))
    with torch.no_grad():
        for linear in (router.mlp[0], router.mlp[3]):
            linear.weight.copy_(torch.eye(3))
            linear.bias.zero_()
    features = 10 * torch.eye(3)[[0, 2, 1, 2]]
    values = torch.tensor([[2.0, 1.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 2.0], [0.0, 0.0, 4.0]])
    assert router.choose(features).tolist() == [0, 2, 1, 2]
    metrics = evaluate_router(router, features, values)
    assert metrics["accuracy"] == 0.75  # the second prompt's best arm is b
    assert metrics["routed"] == pytest.approx((2 + 2 + 2 + 4) / 4) and metrics["oracle"] == pytest.approx(11 / 4)
    assert metrics["chosen_counts"] == {"a": 1, "b": 1, "c": 2}


# ----- the recipe --------------------------------------------------------------------------------------------------

VOCAB = 96  # the character tokenizer's size
WORDS = {
    "code": "def add ( a , b ) : return a + b ; x = [ i * 2 for i in range ( 10 ) ] ; print ( x )",
    "prose": "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun",
}


def peaked(model):
    """Sharper next-token distributions than random init gives, so greedy text has no float near-ties."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    """A folder shaped like a domains lab's output: target, tokenizer, drafters/<name>, corpus/train.jsonl."""
    root = tmp_path_factory.mktemp("lab")
    # no EOS: every generation runs to its length limit, so every prompt has drafting rounds
    tiny = dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, eos_token_id=None)
    peaked(tiny_causal_lm("llama", num_layers=2, seed=0, **tiny)).save_pretrained(root / "target")
    for seed, name in enumerate(("distill-code", "distill-prose", "distill-fkl"), start=1):
        peaked(tiny_causal_lm("llama", num_layers=1, seed=seed, **tiny)).save_pretrained(root / "drafters" / name)
    character_tokenizer(VOCAB).save_pretrained(root / "tokenizer")
    (root / "corpus").mkdir()
    rows = [{"path": f"{domain}/{index}.txt", "domain": domain, "text": f"{index} {text} {text}"}
            for domain, text in WORDS.items() for index in range(8)]  # no newlines: one window per file
    (root / "corpus" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


FAST = ["--max_new_tokens", "6", "--num_draft_tokens", "3", "--epochs", "40", "--prompt_tokens", "12"]


def run_recipe(*argv):
    import route

    return route.main([*FAST, *argv])


def test_recipe_from_a_lab_collects_trains_resumes_and_writes_what_routed_drafter_loads(lab_dir, tmp_path):
    from datasets import load_from_disk

    from hf_specdec import RoutedDrafter

    out = tmp_path / "route"
    payload = run_recipe("--lab", str(lab_dir), "--prompts_per_domain", "6", "--output_dir", str(out))
    # the domain drafters by default, not the divergence baseline
    assert payload["arms"] == ["distill-code", "distill-prose"]
    counts = payload["counts"]
    assert counts["prompts"] == 12 and counts["per_domain"] == {"code": 6, "prose": 6}
    assert counts["measured_this_run"] == 12 and (counts["train"], counts["heldout"]) == (8, 4)  # 2 per domain
    assert set(payload["results"]["heldout"]["domains"]) == {"code", "prose", "all"}
    assert counts["matches_plain"] == counts["arm_runs"] == 24  # greedy speculative output = plain output

    lines = [json.loads(line) for line in (out / "collect.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"{d}-{i:04d}" for d in ("code", "prose") for i in range(1, 7)]
    first = lines[0]
    assert set(first["features"]) == {"layer_0", "layer_2"} and len(first["features"]["layer_2"]) == 32
    assert {"acceptance_rate", "tau", "tokens_per_second", "new_tokens"} <= set(first["arms"]["distill-code"])
    dataset = load_from_disk(str(out / "measurements"))
    assert len(dataset) == 12 and {"id", "domain", "prompt", "arms", "plain", "features"} <= set(dataset.column_names)

    routing = json.loads((out / "routing.json").read_text())
    assert routing == {
        "drafters": {name: {"kind": "checkpoint", "path": str((lab_dir / "drafters" / name).resolve())}
                     for name in ("distill-code", "distill-prose")},
        "router": "router", "target": str((lab_dir / "target").resolve()),
    }
    router = AutoModel.from_pretrained(out / "router")
    assert router.config.drafter_names == payload["arms"] and router.config.feature_layer in (0, 2)
    assert {row["layer"] for row in payload["layers_tried"]} == {0, 2}
    report = (out / "route_report.md").read_text()
    assert "## Held-out prompts" in report and "| code |" in report and "python recipes/route.py" in report

    # the features the recipe stored are what the engine pools at generation time for the same prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdec.bench.prompts import Prompt, encode

    target = AutoModelForCausalLM.from_pretrained(lab_dir / "target")
    tokenizer = AutoTokenizer.from_pretrained(lab_dir / "tokenizer")
    ids = torch.tensor([encode(Prompt(first["id"], "code", first["prompt"]), tokenizer, 1024)])
    layer = router.config.feature_layer
    stored = torch.tensor(first["features"][f"layer_{layer}"])
    assert torch.allclose(prompt_features(target, ids, torch.ones_like(ids), layer)[0], stored, atol=1e-5)
    routed = RoutedDrafter.from_pretrained(out, num_draft_tokens=3)
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                       assistant_model=routed), plain)

    # a second run measures nothing and trains the same router; an interrupted line is measured again
    again = run_recipe("--lab", str(lab_dir), "--prompts_per_domain", "6", "--output_dir", str(out))
    assert again["counts"]["measured_this_run"] == 0 and again["feature_layer"] == payload["feature_layer"]
    assert again["results"]["heldout"]["overall"] == payload["results"]["heldout"]["overall"]
    text = (out / "collect.jsonl").read_text().splitlines()
    (out / "collect.jsonl").write_text("\n".join(text[:10]) + "\n" + text[10][:40])  # killed mid-write
    resumed = run_recipe("--lab", str(lab_dir), "--prompts_per_domain", "6", "--output_dir", str(out))
    assert resumed["counts"]["measured_this_run"] == 2 and len((out / "collect.jsonl").read_text().splitlines()) == 12
    with pytest.raises(ValueError, match=r"other settings \(changed: \['max_new_tokens'\]\)"):
        run_recipe("--lab", str(lab_dir), "--prompts_per_domain", "6", "--output_dir", str(out),
                   "--max_new_tokens", "5")


def test_recipe_from_checkpoints_and_a_prompts_file_with_an_ngram_arm(lab_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"{domain}-{index}", "category": domain, "prompt": f"{index} {text}"}
            for domain, text in WORDS.items() for index in range(5)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "route"
    payload = run_recipe(
        "--target", str(lab_dir / "target"), "--tokenizer", str(lab_dir / "tokenizer"),
        "--drafter", f"code={lab_dir / 'drafters' / 'distill-code'}", "--drafters", "code", "ngram",
        "--prompts_file", str(prompts), "--feature_layer", "2", "--objective", "tokens_per_second",
        "--output_dir", str(out),
    )
    assert payload["arms"] == ["code", "ngram"] and payload["feature_layer"] == 2
    assert [row["layer"] for row in payload["layers_tried"]] == [2] and payload["counts"]["prompts"] == 10
    routing = json.loads((out / "routing.json").read_text())
    assert routing["drafters"]["ngram"] == {"kind": "ngram", "max_ngram": 3, "min_ngram": 1}
    assert AutoModel.from_pretrained(out / "router").config.objective == "tokens_per_second"


@pytest.mark.parametrize(("argv", "message"), [
    (["--output_dir", "x"], "either --lab"),
    (["--target", "t", "--output_dir", "x"], "--prompts_file"),
    (["--target", "t", "--prompts_file", "p", "--drafter", "noequals"], "NAME=PATH"),
])
def test_recipe_arguments_fail_clearly(argv, message):
    with pytest.raises(ValueError, match=message):
        run_recipe(*argv)


def test_recipe_names_missing_domain_drafters_and_unknown_arms(lab_dir, tmp_path):
    import shutil

    lab = tmp_path / "lab"
    shutil.copytree(lab_dir, lab)
    with pytest.raises(ValueError, match=r"Unknown drafters \['nope'\]"):
        run_recipe("--lab", str(lab), "--drafters", "distill-code", "nope", "--output_dir", str(tmp_path / "a"))
    shutil.rmtree(lab / "drafters" / "distill-prose")
    with pytest.raises(ValueError, match="no domain drafters"):
        run_recipe("--lab", str(lab), "--output_dir", str(tmp_path / "b"))


@pytest.mark.parametrize("name", ["route", "route_tiny"])
def test_recipe_configs_parse(name):
    from _common import parse_args
    from route import RouteArguments

    (args,) = parse_args((RouteArguments,), ["--config", str(RECIPES / "configs" / f"{name}.yaml")])
    assert args.lab.startswith("out/lab-domains") and args.drafters is None and args.objective == "tau"
