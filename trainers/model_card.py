"""The README.md written next to every checkpoint a drafter trainer saves."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCardData

_VERSIONED = ("hf-specdec", "transformers", "torch", "accelerate", "peft", "trl", "datasets")
_RESULT_KEYS = ("eval_expected_acceptance", "eval_top1_agreement", "eval_divergence", "eval_loss")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _base_model_id(model) -> str | None:
    if hasattr(model, "peft_config"):  # PeftModel: the adapter's base
        config = next(iter(model.peft_config.values()))
        return config.base_model_name_or_path or None
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return name or None


def _last_eval_results(trainer) -> dict[str, float]:
    for entry in reversed(trainer.state.log_history):
        results = {key: entry[key] for key in _RESULT_KEYS if key in entry}
        if results:
            return results
    return {}


def render_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_adapter = hasattr(model, "peft_config")
    base_model = _base_model_id(model)
    title = model_name or os.path.basename(os.path.normpath(trainer.args.output_dir))
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft" if is_adapter else "transformers",
        tags=list(trainer._tag_names),
        datasets=[dataset_name] if dataset_name else None,
        model_name=title,
        pipeline_tag="text-generation",
    )
    args = trainer.args
    settings = {
        **trainer.model_card_summary(),
        "learning rate": args.learning_rate,
        "epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "max steps": args.max_steps if args.max_steps > 0 else None,
        "per-device batch size": args.per_device_train_batch_size,
        "gradient accumulation steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "max length": args.max_length,
    }
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        (
            f"A draft model for speculative decoding, trained with `{type(trainer).__name__}` from hf-specdec "
            f"({'a PEFT adapter' if is_adapter else 'full weights'}"
            f"{f', starting from `{base_model}`' if base_model else ''})."
        ),
        "",
    ]
    if trainer._paper:
        paper = trainer._paper
        lines += [f"Method: {paper['title']} ([arXiv:{paper['arxiv']}](https://arxiv.org/abs/{paper['arxiv']})).", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in settings.items() if value is not None]
    results = _last_eval_results(trainer)
    if results:
        lines += ["", "## Last evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in results.items()]
        lines += [
            "",
            (
                "`expected_acceptance` is Σ_x min(p, q) averaged over held-out tokens: the chance that speculative "
                "sampling at temperature 1 accepts a drafted token. `top1_agreement` is the greedy acceptance rate."
            ),
        ]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM", ""]
    if is_adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "",
            'draft = AutoPeftModelForCausalLM.from_pretrained("<this checkpoint>").merge_and_unload()',
        ]
    else:
        lines += ['draft = AutoModelForCausalLM.from_pretrained("<this checkpoint>")']
    lines += [
        'target = AutoModelForCausalLM.from_pretrained("<the target model>")',
        "output = target.generate(**inputs, assistant_model=draft)",
        "```",
        "",
        "## Framework versions",
        "",
    ]
    lines += [f"- {name}: {v}" for name in _VERSIONED if (v := _package_version(name))]
    return "\n".join(lines) + "\n"
