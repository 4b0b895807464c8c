"""The one worker of every multi-process trainer test, started on 2 CPU processes (gloo) by
`trainer_test_utils.launch_two_processes` under `torchrun` (DDP) or `accelerate launch` (FSDP2, DeepSpeed ZeRO-3).

argv: the output folder, which holds `plan.json`: `{name: {"builder": "module:function", "kwargs": {...}}}` plus
`"_settings"` (config fields every trainer gets, e.g. `ddp_backend="gloo", use_cpu=True`). Each builder is called as
`builder(tmp_path=..., batch_size=2, accumulation=2, **settings, **kwargs)` and returns an untrained trainer. The
worker trains it one step, gathers the student's full weights on every rank (FSDP2 / ZeRO-3 parameters are shards),
and rank 0 writes `<name>.pt` and `facts.json` (how the student and every frozen model were placed). `"save": true`
in a case's kwargs also runs `trainer.save_model()` and records how far the saved checkpoint is from the gathered
weights."""

import json
import os
import sys
from importlib import import_module
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

FROZEN_ATTRIBUTES = ("teacher_model", "ref_model")


def allow_fsdp_on_cpu() -> None:
    """accelerate (1.16) turns an FSDP plugin on only for accelerator devices: in a CPU process (`use_cpu=True`,
    gloo) the plugin that `accelerate launch` configured is dropped and the run silently becomes DDP. PyTorch's
    FSDP2 itself runs on CPU with gloo, so this flips the distributed type back once the state is built — the only
    change to accelerate's FSDP code path that the CPU test needs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    build = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, on every rank (gathering FSDP2 / ZeRO-3 shards is a collective: all ranks call it)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: partitioned, gathered for the duration of the block
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {name: p.detach().clone() for name, p in model.named_parameters()}
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def placement(model: nn.Module) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    params = list(model.parameters())
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the model in .module
    layers = getattr(inner.get_decoder(), "layers", []) if hasattr(inner, "get_decoder") else []
    wrapper = "none"
    if isinstance(model, DistributedDataParallel):
        wrapper = "ddp"
    elif isinstance(model, FSDPModule):
        wrapper = "fsdp2"
    elif type(model).__name__ == "DeepSpeedEngine":
        wrapper = "deepspeed"
    return {
        "wrapper": wrapper,
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "layers": len(layers),
        "layers_sharded": sum(isinstance(layer, FSDPModule) for layer in layers),
        "sharded": any(isinstance(p, DTensor) for p in params) or any(hasattr(p, "ds_id") for p in params),
        # the inner module's mode: DeepSpeedEngine.eval() sets its module's flag, not its own
        "frozen": not inner.training and not any(p.requires_grad for p in params),
    }


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    plan = json.loads((out / "plan.json").read_text())
    settings = plan.pop("_settings")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        allow_fsdp_on_cpu()
    facts = {}
    for name, case in plan.items():
        module, function = case["builder"].split(":")
        kwargs = dict(case.get("kwargs", {}))
        save = kwargs.pop("save", False)
        trainer = getattr(import_module(module), function)(
            tmp_path=out / name, batch_size=2, accumulation=2, **settings, **kwargs
        )
        trainer.train()
        student = trainer.accelerator.unwrap_model(trainer.model)
        weights = full_weights(student)
        facts[name] = {
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "student": placement(trainer.model_wrapped),
            "frozen": {attr: placement(getattr(trainer, attr)) for attr in FROZEN_ATTRIBUTES
                       if getattr(trainer, attr, None) is not None},
        }
        if save:
            trainer.save_model(str(out / name / "saved"))
            if trainer.args.process_index == 0:
                saved = saved_weights(out / name / "saved")
                facts[name]["saved_max_diff"] = max(
                    (saved[key] - value).abs().max().item() for key, value in weights.items()
                )
                facts[name]["saved_missing"] = sorted(set(weights) - set(saved))
        if trainer.args.process_index == 0:
            torch.save(torch.cat([w.flatten() for w in weights.values()]), out / f"{name}.pt")
    if torch.distributed.get_rank() == 0:
        (out / "facts.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
