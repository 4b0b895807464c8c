"""Train an EAGLE-3 head for a target with Eagle3Trainer, then report its held-out acceptance per draft step.

    python recipes/eagle3.py --config recipes/configs/eagle3.yaml                 # tiny offline run
    accelerate launch recipes/eagle3.py --config recipes/configs/eagle3.yaml      # 1..N processes
    python recipes/eagle3.py --config recipes/configs/eagle3.yaml --tiny false \\
        --target_model path/to/target --dataset_path my_data.jsonl --output_dir out/eagle3-mine

    # from stored teacher outputs: no target in memory while the head trains
    python recipes/offline_teacher.py --tiny true --output_dir out/teacher --state_layers 1 2 3
    python recipes/eagle3.py --config recipes/configs/eagle3.yaml --offline_teacher out/teacher

The head reads the target's own hidden states, so EAGLE-3 heads are best trained on the target's own answers:
write them with `recipes/make_synthetic_dataset.py` and pass the result as `--dataset_path`. `--draft_model` (a
saved head) continues training a head instead of starting a fresh one. `--offline_teacher` trains from a
`recipes/offline_teacher.py` folder instead (its train/ and eval/ splits, tokenizer and target/ config and embedding;
store the layers the head reads with `--state_layers`): the tiny world, `--target_model` and the dataset flags are
then unused. The saved head is in the speculators format (vLLM);
`Eagle3DraftModel.from_pretrained(dir).save_pretrained(other, format="eagle3")` writes SGLang's.
"""

from dataclasses import dataclass, field
from pathlib import Path

from _common import RecipeArguments, load_datasets, parse_args, report, tiny_models

from trainers import Eagle3Trainer, Eagle3TrainingConfig


@dataclass
class OfflineTeacherArguments:
    offline_teacher: str | None = field(default=None, metadata={
        "help": "A recipes/offline_teacher.py output folder: train from its stored target states and log-probabilities, "
                "with no target loaded (the tiny world, --target_model and the dataset flags are then unused)."})


def main(argv=None):
    recipe, offline, config = parse_args((RecipeArguments, OfflineTeacherArguments, Eagle3TrainingConfig), argv)
    if offline.offline_teacher:
        trainer = offline_trainer(recipe, offline.offline_teacher, config)
    else:
        train, heldout = load_datasets(recipe, config.output_dir)
        if recipe.tiny:
            tokenizer, target, _ = tiny_models(recipe, config.output_dir, train)
        elif recipe.target_model:
            tokenizer, target = None, recipe.target_model  # the trainer loads the target and its tokenizer
        else:
            raise ValueError("Give --target_model (a folder or Hub name), --tiny, or --offline_teacher.")
        trainer = Eagle3Trainer(model=recipe.draft_model, teacher_model=target, args=config, train_dataset=train,
                                eval_dataset=heldout, processing_class=tokenizer)
    before = heldout_acceptance(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    report(config.output_dir, f"Eagle3Trainer ({config.ttt_steps} TTT steps)",
           {"head before": before, "head after": heldout_acceptance(trainer)})


def offline_trainer(recipe: RecipeArguments, folder: str, config: Eagle3TrainingConfig) -> Eagle3Trainer:
    """A trainer over a recipes/offline_teacher.py folder: its splits, its tokenizer, its target's config and
    embedding (target/); the metadata (teacher.json) is checked against the head."""
    from datasets import load_from_disk

    if recipe.target_model or recipe.dataset_path or recipe.dataset_name:
        raise ValueError("--offline_teacher brings its data and what the head needs of the target: drop "
                         "--target_model and the dataset flags.")
    return Eagle3Trainer(model=recipe.draft_model, args=config, teacher_metadata=folder,
                         train_dataset=load_from_disk(str(Path(folder) / "train")),
                         eval_dataset=load_from_disk(str(Path(folder) / "eval")))


def heldout_acceptance(trainer) -> dict[str, float]:
    """Held-out Σ min(p, q) of the first draft token and the greedy accuracy of every draft step (`acc_<i>`: the
    head drafting i tokens past its last target state), over all processes."""
    metrics = trainer.evaluate()
    steps = {key[len("eval_"):]: value for key, value in metrics.items() if key.startswith("eval_acc_")}
    return {"expected_acceptance": metrics["eval_expected_acceptance"], "top1_agreement": steps["acc_0"], **steps}


if __name__ == "__main__":
    main()
