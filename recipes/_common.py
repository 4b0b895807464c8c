"""What the training recipes share: `--config file.yaml` parsing, the models and data they start from (Hub names,
local paths, or a tiny offline world), plain target fine-tuning, held-out acceptance measurement and reporting."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

try:
    import trainers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import tiny_corpus, tiny_llama, tiny_tokenizer

from trainers.data import DraftDataCollator, tokenize_dataset
from trainers.losses import expected_acceptance, shared_vocab, supervised_positions, top1_agreement


@dataclass
class RecipeArguments:
    """Where the models and data come from. Give Hub names or local paths, or `tiny: true` for an offline world."""

    tiny: bool = field(
        default=False,
        metadata={
            "help": "Build everything offline: a character tokenizer, a synthetic language written to local JSONL "
            "files, a small target trained on it and a random draft (see recipes/tiny.py)."
        },
    )
    target_model: str | None = field(default=None, metadata={"help": "Hub name or path of the target (teacher)."})
    draft_model: str | None = field(default=None, metadata={"help": "Hub name or path of the draft's initial model."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (downloaded by `datasets`)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "Local dataset file (.json/.jsonl/.csv/.parquet) or `save_to_disk` folder."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Held-out split; default: `eval_fraction` of train."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Held-out fraction of train when there is no eval split."}
    )
    tiny_train_rows: int = field(default=1024, metadata={"help": "Tiny world: training sentences."})
    tiny_eval_rows: int = field(default=128, metadata={"help": "Tiny world: held-out sentences."})
    tiny_target_layers: int = field(default=4, metadata={"help": "Tiny world: target decoder layers."})
    tiny_target_steps: int = field(
        default=300, metadata={"help": "Tiny world: steps that train the target on the data."}
    )
    tiny_draft_layers: int = field(default=1, metadata={"help": "Tiny world: draft decoder layers."})


def parse_args(dataclass_types: tuple, argv: list[str] | None = None):
    """`HfArgumentParser` with a `--config file.yaml` convention: the YAML's keys (any field of any of the
    dataclasses) become defaults, and command-line flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1]
        del argv[index : index + 2]
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; every key must be a field of {[t.__name__ for t in dataclass_types]}."
            )
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the YAML satisfies a required flag
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


# ----- data -------------------------------------------------------------------------------------------------------


def write_tiny_dataset(directory: Path, recipe: RecipeArguments) -> tuple[str, str]:
    """The synthetic language's train / held-out sentences as local JSONL files (prompt, completion, text)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows, seed in (("train", recipe.tiny_train_rows, 0), ("eval", recipe.tiny_eval_rows, 1)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in tiny_corpus(rows, seed=seed)))
        paths.append(str(path))
    return paths[0], paths[1]


def load_datasets(recipe: RecipeArguments, output_dir: str, columns: tuple[str, ...] = ("prompt", "completion")):
    """`(train, eval)` datasets from the Hub, a local file or the tiny world."""
    from datasets import load_dataset, load_from_disk

    if recipe.tiny:
        with PartialState().main_process_first():
            train_file, eval_file = write_tiny_dataset(Path(output_dir) / "data", recipe)
        data = load_dataset("json", data_files={"train": train_file, "eval": eval_file})
        return data["train"].select_columns(list(columns)), data["eval"].select_columns(list(columns))
    if recipe.dataset_path:
        path = Path(recipe.dataset_path)
        if path.is_dir():
            data = load_from_disk(str(path))
        else:
            kind = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
            data = load_dataset(kind, data_files=str(path))
    elif recipe.dataset_name:
        data = load_dataset(recipe.dataset_name, recipe.dataset_config)
    else:
        raise ValueError("Give a dataset: --dataset_path <local file>, --dataset_name <hub name>, or --tiny.")
    train = data[recipe.train_split]
    if recipe.eval_split:
        return train, data[recipe.eval_split]
    split = train.train_test_split(test_size=recipe.eval_fraction, seed=0)
    return split["train"], split["test"]


# ----- models -----------------------------------------------------------------------------------------------------


def finetune_causal_lm(model, tokenizer, dataset, output_dir: str, max_steps: int, learning_rate: float = 3e-3):
    """Plain next-token cross-entropy fine-tuning (the target stage of the AdaSPEC flow; the tiny world's target)."""
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(max_steps // 20, 1),
        logging_steps=max(max_steps // 5, 1),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    train = tokenize_dataset(dataset, tokenizer, max_length=512)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=DraftDataCollator(tokenizer.pad_token_id)
    )
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    return trainer.accelerator.unwrap_model(trainer.model).eval()


def tiny_models(recipe: RecipeArguments, output_dir: str, train_dataset):
    """`(tokenizer, target, draft)` of the tiny world: the target is trained on the tiny data first."""
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)  # models this small run fastest on one thread (and far faster on a busy CPU)
    tokenizer = tiny_tokenizer()
    target = tiny_llama(
        hidden_size=64, intermediate_size=128, num_hidden_layers=recipe.tiny_target_layers, seed=0, tokenizer=tokenizer
    )
    target = finetune_causal_lm(target, tokenizer, train_dataset, f"{output_dir}/tiny-target", recipe.tiny_target_steps)
    draft = tiny_llama(num_hidden_layers=recipe.tiny_draft_layers, seed=1, tokenizer=tokenizer)
    return tokenizer, target, draft


def load_models(recipe: RecipeArguments):
    """`(tokenizer, target, draft)` from Hub names or paths (the draft's tokenizer is the one used)."""
    if not (recipe.target_model and recipe.draft_model):
        raise ValueError("Give --target_model and --draft_model (Hub names or paths), or --tiny.")
    tokenizer = AutoTokenizer.from_pretrained(recipe.draft_model)
    target = AutoModelForCausalLM.from_pretrained(recipe.target_model, dtype="auto")
    draft = AutoModelForCausalLM.from_pretrained(recipe.draft_model, dtype="auto")
    return tokenizer, target, draft


# ----- measurement and reporting -------------------------------------------------------------------------------


@torch.no_grad()
def heldout_acceptance(draft_logits_fn, target, dataset, tokenizer, batch_size: int = 32) -> dict[str, float]:
    """Token-mean expected acceptance Σ_x min(p, q) and greedy agreement of a draft against `target` on the trained
    tokens of `dataset`. `draft_logits_fn(input_ids, attention_mask)` returns the draft's logits."""
    rows = tokenize_dataset(dataset, tokenizer, max_length=512)
    collate = DraftDataCollator(tokenizer.pad_token_id)
    device = next(target.parameters()).device
    totals = {"expected_acceptance": 0.0, "top1_agreement": 0.0}
    count = 0
    for start in range(0, len(rows), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))]).items()
        }
        positions = supervised_positions(batch["labels"])
        p = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][positions]
        q = draft_logits_fn(batch["input_ids"], batch["attention_mask"])[:, :-1][positions]
        q, p = shared_vocab(q, p)
        totals["expected_acceptance"] += float(expected_acceptance(q, p).sum())
        totals["top1_agreement"] += float(top1_agreement(q, p).sum())
        count += len(p)
    return {name: total / max(count, 1) for name, total in totals.items()}


def model_logits(model):
    model.eval()
    return lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits


def report(output_dir: str, title: str, results: dict[str, dict[str, float]]) -> None:
    """Print a before/after table and write it to `<output_dir>/results.json` (main process only)."""
    if not PartialState().is_main_process:
        return
    os.makedirs(output_dir, exist_ok=True)
    Path(output_dir, "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{title}: held-out expected acceptance Σmin(p,q) / greedy top-1 agreement")
    for name, metrics in results.items():
        print(f"  {name:<28} {metrics['expected_acceptance']:.4f} / {metrics['top1_agreement']:.4f}")
    print(f"  (written to {Path(output_dir, 'results.json')})")


def eval_metrics(trainer) -> dict[str, float]:
    """The trainer's held-out acceptance metrics, computed over all processes."""
    metrics = trainer.evaluate()
    return {
        "expected_acceptance": metrics["eval_expected_acceptance"],
        "top1_agreement": metrics["eval_top1_agreement"],
    }
