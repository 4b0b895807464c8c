"""The AdaSPEC flow: (1) optionally fine-tune the target on the task, (2) distil a reference draft from it on all
tokens with forward KL (this is also the DistillSpec baseline), (3) train a fresh copy of the draft's initial model
with AdaSPECTrainer on the top-k tokens by ΔL, for epochs / k epochs as the paper does. Reports held-out expected
acceptance of the initial draft, the reference and the AdaSPEC draft.

    python recipes/adaspec.py --config recipes/configs/adaspec.yaml                 # tiny offline run
    accelerate launch recipes/adaspec.py --config recipes/configs/adaspec.yaml      # 1..N processes
    python recipes/adaspec.py --config recipes/configs/adaspec.yaml --tiny false \\
        --target_model EleutherAI/pythia-1.4b --draft_model EleutherAI/pythia-31m \\
        --dataset_path gsm8k_train.jsonl --output_dir out/adaspec-pythia
"""

import copy
import dataclasses
from dataclasses import dataclass, field

from _common import (
    RecipeArguments,
    eval_metrics,
    finetune_causal_lm,
    load_datasets,
    load_models,
    parse_args,
    report,
    tiny_models,
)

from trainers import AdaSPECConfig, AdaSPECTrainer, DistillTrainer


@dataclass
class AdaSPECFlowArguments:
    """The stages around AdaSPECTrainer."""

    finetune_target: bool = field(
        default=False, metadata={"help": "Stage 1: fine-tune the target on the training data with cross-entropy first."}
    )
    target_finetune_steps: int = field(default=200, metadata={"help": "Stage 1: optimizer steps."})
    target_finetune_learning_rate: float = field(default=1e-5, metadata={"help": "Stage 1: learning rate."})
    reference_epochs: float = field(
        default=3.0, metadata={"help": "Stage 2: epochs of forward-KL distillation of the reference draft."}
    )
    scale_epochs_by_k: bool = field(
        default=True,
        metadata={
            "help": "Stage 3 runs reference_epochs / k epochs (the paper: 3 → 7.5 for k = 0.4); else num_train_epochs."
        },
    )
    reference_model: str | None = field(
        default=None, metadata={"help": "Skip stage 2 and use this already-distilled reference (Hub name or path)."}
    )


def main(argv=None):
    recipe, flow, config = parse_args((RecipeArguments, AdaSPECFlowArguments, AdaSPECConfig), argv)
    train, heldout = load_datasets(recipe, config.output_dir)
    tokenizer, target, draft_init = (
        tiny_models(recipe, config.output_dir, train) if recipe.tiny else load_models(recipe)
    )
    if flow.finetune_target and not recipe.tiny:  # the tiny world's target is already trained on this data
        target = finetune_causal_lm(
            target,
            tokenizer,
            train,
            f"{config.output_dir}/target",
            flow.target_finetune_steps,
            flow.target_finetune_learning_rate,
        )
    common = {"teacher_model": target, "train_dataset": train, "eval_dataset": heldout, "processing_class": tokenizer}

    results = {}
    if flow.reference_model:
        reference = flow.reference_model
    else:
        reference_args = dataclasses.replace(
            config,
            output_dir=f"{config.output_dir}/reference",
            divergence="forward_kl",
            lmbda=0.0,
            num_train_epochs=flow.reference_epochs,
        )
        reference_trainer = DistillTrainer(model=copy.deepcopy(draft_init), args=reference_args, **common)
        results["draft init"] = eval_metrics(reference_trainer)
        reference_trainer.train()
        reference_trainer.save_model()
        results["reference (DistillSpec)"] = eval_metrics(reference_trainer)
        reference = reference_trainer.accelerator.unwrap_model(reference_trainer.model)

    draft_epochs = flow.reference_epochs / config.k if flow.scale_epochs_by_k else config.num_train_epochs
    draft_args = dataclasses.replace(config, output_dir=f"{config.output_dir}/draft", num_train_epochs=draft_epochs)
    trainer = AdaSPECTrainer(model=copy.deepcopy(draft_init), ref_model=reference, args=draft_args, **common)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(draft_args.output_dir)
    results[f"AdaSPEC (k={config.k}, {draft_epochs:g} ep)"] = eval_metrics(trainer)
    report(config.output_dir, "AdaSPEC flow", results)


if __name__ == "__main__":
    main()
