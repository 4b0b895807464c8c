"""Distil a drafter from its target with DistillTrainer (DistillSpec), then report held-out expected acceptance.

    python recipes/distill.py --config recipes/configs/distill.yaml                 # tiny offline run
    accelerate launch recipes/distill.py --config recipes/configs/distill.yaml      # 1..N processes
    python recipes/distill.py --config recipes/configs/distill.yaml --tiny false \\
        --target_model Qwen/Qwen2.5-7B-Instruct --draft_model Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_path my_prompts.jsonl --output_dir out/distill-qwen
"""

from _common import RecipeArguments, eval_metrics, load_datasets, load_models, parse_args, report, tiny_models

from trainers import DistillConfig, DistillTrainer


def main(argv=None):
    recipe, config = parse_args((RecipeArguments, DistillConfig), argv)
    train, heldout = load_datasets(recipe, config.output_dir)
    tokenizer, target, draft = tiny_models(recipe, config.output_dir, train) if recipe.tiny else load_models(recipe)
    trainer = DistillTrainer(
        model=draft,
        teacher_model=target,
        args=config,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
    )
    before = eval_metrics(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
    report(
        config.output_dir,
        f"DistillTrainer ({config.divergence})",
        {"draft before": before, "draft after": eval_metrics(trainer)},
    )


if __name__ == "__main__":
    main()
