"""The recipes stay runnable: each one end to end on a minimal tiny world, with `--config` YAML + CLI overrides."""

import json
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

TINY = [
    "--tiny_train_rows",
    "32",
    "--tiny_eval_rows",
    "16",
    "--tiny_target_steps",
    "3",
    "--max_steps",
    "2",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "8",
]


def test_config_file_values_are_defaults_that_flags_override(tmp_path):
    from _common import RecipeArguments, parse_args

    from trainers import DistillConfig

    recipe, config = parse_args(
        (RecipeArguments, DistillConfig),
        ["--config", str(RECIPES / "configs" / "distill.yaml"), "--divergence", "jsd", "--output_dir", str(tmp_path)],
    )
    assert recipe.tiny and config.divergence == "jsd" and config.lmbda == 0.5 and config.output_dir == str(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("divergense: tvd\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_args((RecipeArguments, DistillConfig), ["--config", str(bad)])


@pytest.mark.parametrize("name, extra", [("distill", ["--max_new_tokens", "8"]), ("adaspec", []), ("soft", [])])
def test_recipe_runs_offline_and_reports_acceptance(tmp_path, name, extra):
    module = __import__(name)
    config = str(RECIPES / "configs" / f"{name}.yaml")
    module.main(["--config", config, "--output_dir", str(tmp_path), *TINY, *extra])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and all(0.0 <= r["expected_acceptance"] <= 1.0 for r in results.values())
