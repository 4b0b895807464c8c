"""A supervised fine-tuning script in the style of TRL's `examples/scripts/sft.py`, where `--trainer distill` swaps
`SFTConfig` / `SFTTrainer` for `DistillConfig` / `DistillTrainer`: the same command line, the same dataset objects,
the same TrainingArguments-style fields (`output_dir`, `max_steps`, `learning_rate`, `packing`, `max_length`, ...).
Only the distillation needs one more argument, the teacher.

```bash
# SFT, as with TRL
python tests/trainers/trl_style_script.py \\
    --model_name_or_path Qwen/Qwen2.5-0.5B \\
    --dataset_name trl-lib/Capybara \\
    --learning_rate 2.0e-5 \\
    --max_steps 100 \\
    --packing \\
    --per_device_train_batch_size 2 \\
    --output_dir Qwen2.5-0.5B-SFT

# the same run, distilling the drafter from a target instead
python tests/trainers/trl_style_script.py --trainer distill \\
    --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct --lmbda 0 \\
    --model_name_or_path Qwen/Qwen2.5-0.5B \\
    --dataset_name trl-lib/Capybara \\
    --learning_rate 2.0e-5 \\
    --max_steps 100 \\
    --packing \\
    --per_device_train_batch_size 2 \\
    --output_dir Qwen2.5-0.5B-DistillSpec
```

`--dataset_name` is anything `datasets.load_dataset` opens: a Hub dataset, or a local folder of `train.jsonl` /
`test.jsonl` files (what the tests use); `--dataset_streaming` reads it as an `IterableDataset` (then give
`--max_steps`). Every TRL dataset format works with both trainers: language modeling (`text`), prompt-completion,
conversational (`messages`), conversational prompt-completion, and tokenized `input_ids`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from transformers import AutoTokenizer, HfArgumentParser

try:
    from trainers import DistillConfig, DistillTrainer
except ImportError:  # run as a file from a checkout: the repository root holds the `trainers` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from trainers import DistillConfig, DistillTrainer


@dataclass
class ScriptArguments:
    """What TRL's `ScriptArguments` holds (dataset choice), plus the trainer switch and the teacher."""

    model_name_or_path: str = field(metadata={"help": "The model to train: a Hub id or a local folder."})
    dataset_name: str = field(metadata={"help": "A Hub dataset or a local folder/file `load_dataset` can open."})
    trainer: str = field(default="sft", metadata={"help": "Which trainer to run.", "choices": ["sft", "distill"]})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "`--trainer distill`: the target model the drafter is distilled from."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset (an IterableDataset)."})


def config_class(trainer: str):
    if trainer == "distill":
        return DistillConfig
    from trl import SFTConfig

    return SFTConfig


def parse(argv: list[str] | None = None):
    """`(script_args, training_args)`; the `--trainer` flag picks the config class the other flags fill."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--trainer", default="sft", choices=["sft", "distill"])
    trainer, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser((ScriptArguments, config_class(trainer.trainer)))
    return parser.parse_args_into_dataclasses(args=argv)


def main(script_args: ScriptArguments, training_args):
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           streaming=script_args.dataset_streaming)
    train_dataset = dataset[script_args.dataset_train_split]
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)

    if script_args.trainer == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=script_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
    else:
        if script_args.teacher_model_name_or_path is None:
            raise SystemExit("--trainer distill needs --teacher_model_name_or_path.")
        trainer = DistillTrainer(
            model=script_args.model_name_or_path,
            teacher_model=script_args.teacher_model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )

    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


if __name__ == "__main__":
    main(*parse())
