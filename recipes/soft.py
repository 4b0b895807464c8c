"""Sorted fine-tuning (SD2): cut a draft from the target's first layers (`truncate_model`), train all its exits at
once with SoFTTrainer, and report each exit's held-out expected acceptance against the target before and after.
The saved checkpoint records its exits (`config.sorted_exits`, and thresholds if given) for a sorted-draft drafter.

    python recipes/soft.py --config recipes/configs/soft.yaml                       # tiny offline run
    accelerate launch recipes/soft.py --config recipes/configs/soft.yaml            # 1..N processes
    python recipes/soft.py --config recipes/configs/soft.yaml --tiny false \\
        --target_model lmsys/vicuna-7b-v1.5 --dataset_path sharegpt.jsonl \\
        --exits 6 9 12 --exit_thresholds 0.5 0.5 0 --output_dir out/soft-vicuna
"""

from dataclasses import dataclass, field

from _common import RecipeArguments, heldout_acceptance, load_datasets, parse_args, report, tiny_models
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import SoFTConfig, SoFTTrainer, exit_logits, truncate_model


@dataclass
class SoFTFlowArguments:
    distill_from_target: bool = field(
        default=False, metadata={"help": "Each exit distils from the target instead of learning the labels (CE)."}
    )


def exit_acceptance(draft, target, heldout, tokenizer, exits) -> dict[str, dict[str, float]]:
    draft.eval()
    return {
        f"exit {e}": heldout_acceptance(
            lambda ids, mask, e=e: exit_logits(draft, ids, mask, [e])[e], target, heldout, tokenizer
        )
        for e in exits
    }


def main(argv=None):
    recipe, flow, config = parse_args((RecipeArguments, SoFTFlowArguments, SoFTConfig), argv)
    train, heldout = load_datasets(recipe, config.output_dir)
    if recipe.tiny:
        tokenizer, target, _ = tiny_models(recipe, config.output_dir, train)
    else:
        tokenizer = AutoTokenizer.from_pretrained(recipe.target_model)
        target = AutoModelForCausalLM.from_pretrained(recipe.target_model, dtype="auto")
    # SD2: the draft is the target's first layers (or a given draft model), trained so every exit drafts well.
    if recipe.draft_model:
        draft = AutoModelForCausalLM.from_pretrained(recipe.draft_model, dtype="auto")
    else:
        draft = truncate_model(target, config.exits[-1])
    main_process = PartialState().is_main_process
    before = exit_acceptance(draft, target, heldout, tokenizer, config.exits) if main_process else {}
    trainer = SoFTTrainer(
        model=draft,
        teacher_model=target if flow.distill_from_target else None,
        args=config,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        trained = trainer.accelerator.unwrap_model(trainer.model)
        after = exit_acceptance(trained, target, heldout, tokenizer, config.exits)
        results = {}
        for name in before:
            results[f"{name} before"], results[f"{name} after"] = before[name], after[name]
        report(config.output_dir, f"SoFT exits {config.exits}", results)


if __name__ == "__main__":
    main()
