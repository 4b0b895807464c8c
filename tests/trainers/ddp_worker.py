"""Run under `torchrun --nproc_per_node 2` by test_gradients.py: one SGD step of DistillTrainer and SoFTTrainer on
two CPU processes (gloo; `use_cpu=True` is what makes accelerate use them); rank 0 writes the updated parameters and placement facts to the directory in argv[1]."""

import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from trainer_test_utils import build_sgd_trainer, flat_weights
from transformers import TrainerCallback


class PlacementProbe(TrainerCallback):
    """Records, during training, how the student and the frozen teacher are wrapped."""

    def __init__(self, trainer):
        self.trainer, self.facts = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        teacher = getattr(self.trainer, "teacher_model", None)
        self.facts = {
            "world_size": args.world_size,
            "student_is_ddp": isinstance(self.trainer.model_wrapped, DistributedDataParallel),
            "teacher_is_ddp": isinstance(teacher, DistributedDataParallel),
            "teacher_frozen": teacher is None
            or (not teacher.training and not any(p.requires_grad for p in teacher.parameters())),
        }


torch.set_num_threads(1)
out = Path(sys.argv[1])
facts = {}
for name in ("distill", "soft"):
    trainer = build_sgd_trainer(name, out / name, batch_size=2, accumulation=2, ddp_backend="gloo", use_cpu=True)
    probe = PlacementProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    facts[name] = probe.facts
    if trainer.args.process_index == 0:
        torch.save(flat_weights(trainer), out / f"{name}.pt")
if torch.distributed.get_rank() == 0:
    (out / "facts.json").write_text(json.dumps(facts))
