"""Train an EAGLE-3 head for a target with Eagle3Trainer, then report its held-out acceptance per draft step.

    python recipes/eagle3.py --config recipes/configs/eagle3.yaml                 # tiny offline run
    accelerate launch recipes/eagle3.py --config recipes/configs/eagle3.yaml      # 1..N processes
    python recipes/eagle3.py --config recipes/configs/eagle3.yaml --tiny false \\
        --target_model path/to/target --dataset_path my_data.jsonl --output_dir out/eagle3-mine

The head reads the target's own hidden states, so EAGLE-3 heads are best trained on the target's own answers:
write them with `recipes/make_synthetic_dataset.py` and pass the result as `--dataset_path`. `--draft_model` (a
saved head) continues training a head instead of starting a fresh one. The saved head is in the speculators format
(vLLM); `Eagle3DraftModel.from_pretrained(dir).save_pretrained(other, format="eagle3")` writes SGLang's.
"""

from _common import RecipeArguments, load_datasets, parse_args, report, tiny_models

from trainers import Eagle3Trainer, Eagle3TrainingConfig


def main(argv=None):
    recipe, config = parse_args((RecipeArguments, Eagle3TrainingConfig), argv)
    train, heldout = load_datasets(recipe, config.output_dir)
    if recipe.tiny:
        tokenizer, target, _ = tiny_models(recipe, config.output_dir, train)
    elif recipe.target_model:
        tokenizer, target = None, recipe.target_model  # the trainer loads the target and its tokenizer
    else:
        raise ValueError("Give --target_model (a folder or Hub name), or --tiny.")
    trainer = Eagle3Trainer(model=recipe.draft_model, teacher_model=target, args=config, train_dataset=train,
                            eval_dataset=heldout, processing_class=tokenizer)
    before = heldout_acceptance(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    report(config.output_dir, f"Eagle3Trainer ({config.ttt_steps} TTT steps)",
           {"head before": before, "head after": heldout_acceptance(trainer)})


def heldout_acceptance(trainer) -> dict[str, float]:
    """Held-out Σ min(p, q) of the first draft token and the greedy accuracy of every draft step (`acc_<i>`: the
    head drafting i tokens past its last target state), over all processes."""
    metrics = trainer.evaluate()
    steps = {key[len("eval_"):]: value for key, value in metrics.items() if key.startswith("eval_acc_")}
    return {"expected_acceptance": metrics["eval_expected_acceptance"], "top1_agreement": steps["acc_0"], **steps}


if __name__ == "__main__":
    main()
