"""Precompute a target's teacher outputs once, so drafters train without the target in memory.

    python recipes/offline_teacher.py --tiny true --output_dir out/teacher                       # tiny offline world
    python recipes/offline_teacher.py --target_model meta-llama/Llama-3.1-8B-Instruct \\
        --dataset_path chats.jsonl --output_dir out/teacher-llama --top_k 64 --state_layers 2 16 29

Writes `out/teacher/train` and `out/teacher/eval` (`datasets.save_to_disk`), each row a tokenized training row with
the target's top-k next-token log-probabilities, their tail mass and (with `--state_layers`) the hidden states an
EAGLE-3 head reads, in bf16 (see `trainers/offline.py`), plus `teacher.json`, the tokenizer and `target/`: what a
drafter still needs of the target without its weights (config.json, generation_config.json and the input embedding,
embedding.safetensors). `Eagle3Trainer` trains from it with no target loaded: `--offline_teacher out/teacher` in
recipes/eagle3.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from _common import RecipeArguments, load_datasets, parse_args, tiny_models
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.data import tokenize_dataset
from trainers.offline import TARGET_PARTS_DIR, TargetParts, TeacherMetadata, precompute_teacher


@dataclass
class OfflineTeacherArguments:
    output_dir: str = field(metadata={"help": "Folder for the train/ and eval/ teacher datasets and teacher.json."})
    top_k: int = field(default=64, metadata={"help": "Next-token log-probabilities kept per position (most likely "
                                                     "first); the rest is one tail bucket."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the stored teacher distribution."})
    state_layers: list[int] | None = field(default=None, metadata={
        "help": "The target's hidden_states indices to store (EAGLE-3: low / middle / high, e.g. 2 16 29 for a "
                "32-layer target); none: no states."})
    max_length: int = field(default=1024, metadata={"help": "Tokens kept per row."})
    batch_size: int = field(default=8, metadata={"help": "Rows per target forward."})


def main(argv=None):
    recipe, args = parse_args((RecipeArguments, OfflineTeacherArguments), argv)
    train, heldout = load_datasets(recipe, args.output_dir)
    if recipe.tiny:
        tokenizer, target, _ = tiny_models(recipe, args.output_dir, train)
        teacher_name = str(Path(args.output_dir) / "tiny-target")  # where tiny_models saved it
    elif recipe.target_model:
        teacher_name = recipe.target_model
        tokenizer = AutoTokenizer.from_pretrained(recipe.target_model)
        target = AutoModelForCausalLM.from_pretrained(recipe.target_model, dtype="auto", device_map="auto")
    else:
        raise ValueError("Give --target_model (a Hub name or path) or --tiny true.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name, split in (("train", train), ("eval", heldout)):
        rows = tokenize_dataset(split, tokenizer, args.max_length)
        teacher = precompute_teacher(target, rows, top_k=args.top_k, temperature=args.temperature,
                                     state_layers=args.state_layers, batch_size=args.batch_size, pad_token_id=pad)
        teacher.save_to_disk(str(Path(args.output_dir) / name))
    TargetParts.from_model(target).save(str(Path(args.output_dir) / TARGET_PARTS_DIR))
    metadata = TeacherMetadata(teacher=teacher_name, top_k=args.top_k, temperature=args.temperature,
                               state_layers=args.state_layers, vocab_size=target.config.get_text_config().vocab_size,
                               target_parts=TARGET_PARTS_DIR)
    metadata.save(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"teacher outputs for {len(train)} + {len(heldout)} rows in {args.output_dir}")


if __name__ == "__main__":
    main()
