"""The SD² flow: synthetic data from the target → a guided drafter → a benchmark against the drafter it started
from and against the same drafter distilled (DistillTrainer) on the same data for the same steps.

1. The target answers the training and held-out prompts (`make_synthetic_dataset.py`, accelerated with
   hf_specdec itself), temperature 1 by default.
2. Distilled baseline: `DistillTrainer` (off-policy, the same divergence) on the synthetic data.
3. Guided: `GuidedDrafterTrainer` wraps the same starting drafter with guide modules and trains both.
4. Benchmark: `target.generate(..., assistant_model=drafter)` on held-out prompts, greedy and sampling; reports
   τ (tokens per verification round), α (accepted / drafted) and wall time, plus held-out expected acceptance.

    python recipes/guided.py --config recipes/configs/guided.yaml                   # tiny offline run
    python recipes/guided.py --config recipes/configs/guided.yaml --tiny false \\
        --target_model meta-llama/Llama-3.1-8B-Instruct --draft_model meta-llama/Llama-3.2-1B-Instruct \\
        --verifier_layers 3 16 29 --dataset_name HuggingFaceH4/ultrachat_200k --train_split train_sft \\
        --output_dir out/guided-llama

The tiny world's drafter is first trained briefly on the tiny corpus with cross-entropy, so that, as in the paper,
steering starts from a pretrained drafter rather than a random one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import (
    RecipeArguments,
    finetune_causal_lm,
    load_datasets,
    load_models,
    parse_args,
    tiny_models,
)
from make_synthetic_dataset import SyntheticDataArguments, encode_prompt, generate_synthetic_dataset

import hf_specdec
from trainers import DistillConfig, DistillTrainer, GuidedDrafterConfig, GuidedDrafterTrainer
from trainers.base import BaseDrafterConfig


@dataclass
class GuidedFlowArguments:
    """The stages around GuidedDrafterTrainer."""

    draft_pretrain_steps: int = field(
        default=150, metadata={"help": "Tiny world: cross-entropy steps that make the random draft a 'pretrained' one."}
    )
    num_train_prompts: int = field(default=512, metadata={"help": "Prompts the target answers for training."})
    num_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts (metrics and benchmark)."})
    synthetic_new_tokens: int = field(default=64, metadata={"help": "Tokens the target writes per prompt."})
    synthetic_temperature: float = field(default=1.0, metadata={"help": "Temperature of the synthetic answers."})
    synthetic_chat_template: bool = field(default=True, metadata={"help": "Apply the chat template to prompts."})
    bench_prompts: int = field(default=32, metadata={"help": "Held-out prompts generated in the benchmark."})
    bench_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per benchmark prompt."})
    bench_batch_size: int = field(default=8, metadata={"help": "Benchmark batch size."})
    bench_seeds: int = field(default=2, metadata={"help": "Sampling runs (seeds) averaged in the benchmark."})
    skip_distill_baseline: bool = field(default=False, metadata={"help": "Do not train the distilled baseline."})


def main(argv=None):
    recipe, flow, config = parse_args((RecipeArguments, GuidedFlowArguments, GuidedDrafterConfig), argv)
    output_dir = Path(config.output_dir)
    train_text, heldout_text = load_datasets(recipe, config.output_dir)
    if recipe.tiny:
        tokenizer, target, draft = tiny_models(recipe, config.output_dir, train_text)
        draft = finetune_causal_lm(draft, tokenizer, train_text, f"{output_dir}/tiny-draft", flow.draft_pretrain_steps)
        flow.synthetic_chat_template = False  # the tiny target is trained on plain text
    else:
        tokenizer, target, draft = load_models(recipe)
    if torch.cuda.is_available():
        target, draft = target.cuda(), draft.cuda()
    target.eval()

    prompt_column = "prompt" if "prompt" in train_text.column_names else "messages"
    splits = {"train": (train_text, flow.num_train_prompts), "heldout": (heldout_text, flow.num_eval_prompts)}
    synthetic = {}
    for name, (rows, count) in splits.items():
        data = SyntheticDataArguments(
            output_dir=str(output_dir / f"synthetic-{name}"),
            max_new_tokens=flow.synthetic_new_tokens,
            temperature=flow.synthetic_temperature,
            chat_template=flow.synthetic_chat_template,
            num_draft_tokens=config.draft_length,
            max_prompt_tokens=config.max_length // 2,
            seed=config.seed,
        )
        prompts = rows.select(range(min(count, len(rows))))[prompt_column]
        synthetic[name] = generate_synthetic_dataset(target, tokenizer, prompts, data, draft=draft)["train"]
    train = synthetic["train"].select_columns(["input_ids", "labels"])
    heldout = synthetic["heldout"].select_columns(["input_ids", "labels"])
    common = {"teacher_model": target, "train_dataset": train, "eval_dataset": heldout, "processing_class": tokenizer}

    drafters = {"plain (starting drafter)": ("model", copy.deepcopy(draft))}
    metrics = {}
    if not flow.skip_distill_baseline:
        distill_trainer = DistillTrainer(model=copy.deepcopy(draft), args=distill_args(config), **common)
        distill_trainer.train()
        distill_trainer.save_model()
        distilled = distill_trainer.accelerator.unwrap_model(distill_trainer.model).eval()
        metrics["distilled (DistillTrainer)"] = eval_acceptance(distill_trainer)
        drafters["distilled (DistillTrainer)"] = ("model", distilled)

    guided_trainer = GuidedDrafterTrainer(model=copy.deepcopy(draft), args=config, **common)
    # before training the guide is a no-op, so this evaluates the starting drafter
    metrics["plain (starting drafter)"] = eval_acceptance(guided_trainer)
    guided_trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    guided_trainer.save_model()
    if guided_trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
    guided = guided_trainer.accelerator.unwrap_model(guided_trainer.model).eval()
    metrics["guided (GuidedDrafterTrainer)"] = eval_acceptance(guided_trainer)
    drafters["guided (GuidedDrafterTrainer)"] = ("guided", guided)

    prompts = [
        encode_prompt(tokenizer, p, config.max_length // 2, flow.synthetic_chat_template)
        for p in heldout_text.select(range(min(flow.bench_prompts, len(heldout_text))))[prompt_column]
    ]
    plain = benchmark(target, "plain", None, tokenizer, prompts, flow, config)
    results = {"plain generate (no drafter)": plain}
    for name, (kind, model) in drafters.items():
        row = {**metrics.get(name, {}), **benchmark(target, kind, model, tokenizer, prompts, flow, config)}
        for mode in ("greedy", "sampling"):  # wall time of plain generate on the same batches / this drafter's
            row[f"{mode}_speedup"] = plain[f"{mode}_seconds"] / row[f"{mode}_seconds"]
        results[name] = row
    report(output_dir, results)


def distill_args(config: GuidedDrafterConfig) -> DistillConfig:
    """The guided run's training settings for the distilled baseline: same data, steps, divergence; off-policy."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(BaseDrafterConfig) if f.init}
    shared.update(output_dir=f"{config.output_dir}/distilled", lmbda=0.0)
    return DistillConfig(**shared)


def eval_acceptance(trainer) -> dict[str, float]:
    """Held-out expected acceptance Σ min(p, q) and greedy agreement, teacher-forced (guided: with stale guides)."""
    metrics = trainer.evaluate()
    return {
        "heldout_expected_acceptance": metrics["eval_expected_acceptance"],
        "heldout_top1_agreement": metrics["eval_top1_agreement"],
    }


@torch.no_grad()
def benchmark(target, kind, model, tokenizer, prompts, flow: GuidedFlowArguments, config) -> dict[str, float]:
    """τ, α and wall time of speculative generation with this drafter, greedy and sampling (temperature 1);
    `kind="plain"` times plain `generate` on the same batches and seeds (the speed-up baseline)."""
    results = {}
    eos = tokenizer.eos_token_id
    for mode, seeds in (("greedy", [0]), ("sampling", list(range(flow.bench_seeds)))):
        accepted = drafted = rounds = 0
        seconds = 0.0
        for seed in seeds:
            for start in range(0, len(prompts), flow.bench_batch_size):
                batch = prompts[start : start + flow.bench_batch_size]
                width = max(len(p) for p in batch)
                pad = tokenizer.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=target.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=target.device)
                if kind == "plain":
                    assistant = {}
                elif kind == "guided":
                    assistant = {"assistant_model": model.as_drafter(num_draft_tokens=config.draft_length)}
                else:
                    assistant = {"assistant_model": hf_specdec.ModelDrafter(model, num_draft_tokens=config.draft_length)}
                sampling = (
                    {"do_sample": True, "temperature": 1.0, "top_k": 0} if mode == "sampling" else {"do_sample": False}
                )
                torch.manual_seed(seed)
                begin = time.perf_counter()
                out = target.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=flow.bench_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    return_dict_in_generate=True,
                    **assistant,
                    **sampling,
                )
                seconds += time.perf_counter() - begin
                stats = getattr(out, "spec_stats", None)
                if stats is not None:
                    accepted += int(stats.accepted.sum())
                    drafted += int(stats.drafted.sum())
                    rounds += int(stats.rounds.sum())
        if kind != "plain":
            results[f"{mode}_tau"] = (accepted + rounds) / max(rounds, 1)
            results[f"{mode}_alpha"] = accepted / max(drafted, 1)
        results[f"{mode}_seconds"] = seconds
    return results


def report(output_dir: Path, results: dict[str, dict[str, float]]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    columns = ["heldout_expected_acceptance", "greedy_tau", "greedy_alpha", "greedy_speedup", "sampling_tau",
               "sampling_alpha", "sampling_speedup"]
    print("\nSD² flow: held-out Σmin(p,q); τ = tokens per round, α = accepted / drafted, speed-up = plain generate's"
          " wall time / this drafter's (greedy, sampling)")
    print(
        f"  {'drafter':<32}"
        + "".join(f"{c:>14}" for c in ["E[accept]", "greedy τ", "greedy α", "greedy ×", "sample τ", "sample α",
                                       "sample ×"])
    )
    for name, row in results.items():
        print(f"  {name:<32}" + "".join(f"{row.get(c, float('nan')):>14.3f}" for c in columns))
    print(f"  (written to {output_dir / 'results.json'})")


if __name__ == "__main__":
    main()
