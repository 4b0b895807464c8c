"""Timing and the speed-up formula: forward meters, per-step costs, E[τ] and the theoretical speed-up."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from typing_extensions import Self

from .. import testing
from ..compat import cache_argument
from ..schedule import expected_tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardMeter:
    """Counts and times the top-level forward calls of some models (for methods that report no SpecStats)."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.models = models
        self.calls = dict.fromkeys(models, 0)
        self.seconds = dict.fromkeys(models, 0.0)
        self._handles, self._started = [], {}

    def __enter__(self) -> Self:
        for name, model in self.models.items():
            self._handles.append(model.register_forward_pre_hook(self._start(name)))
            self._handles.append(model.register_forward_hook(self._stop(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _start(self, name):
        def hook(module, args):
            synchronize(module.device)
            self._started[name] = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(module, args, output):
            synchronize(module.device)
            self.calls[name] += 1
            self.seconds[name] += time.perf_counter() - self._started[name]

        return hook


def state_inputs(model, width: int, target) -> dict:
    """What a drafter that reads states besides tokens takes per step (an EAGLE-3 head: its previous state, and
    the target's embedding)."""
    from ..eagle3 import Eagle3DraftModel

    if not isinstance(model, Eagle3DraftModel):
        return {}
    if model.get_input_embeddings() is None:
        model.attach_target(target)
    return {"hidden_states": torch.zeros(1, width, model.config.hidden_size, device=model.device, dtype=model.dtype)}


@torch.no_grad()
def measure_step_costs(target, draft, num_verify_tokens: int, context_length: int = 32, steps: int = 12) -> dict:
    """Median seconds of one cached decoding step of each model, and of a `num_verify_tokens`-token target forward.

    c = draft step / target step enters the theoretical speedup; `verify_cost_ratio` (a γ+1-token target forward
    over a one-token one) says how far the formula's "verification costs one step" assumption holds here.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = min(target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size)
    context = torch.randint(testing.FIRST_ORDINARY_TOKEN_ID, vocab, (1, context_length), generator=generator)

    def forward_seconds(model, width: int) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        cache_kwargs = {cache_argument(model): cache}
        model(context.to(model.device), use_cache=True, **cache_kwargs, **state_inputs(model, context_length, target))
        tokens = context[:, :width].to(model.device)
        timings = []
        for _ in range(steps + 2):  # the first two are warm-up
            synchronize(model.device)
            start = time.perf_counter()
            model(tokens, use_cache=True, **cache_kwargs, **state_inputs(model, width, target))
            synchronize(model.device)
            timings.append(time.perf_counter() - start)
            cache.crop(-width)
        return statistics.median(timings[2:])

    target_step, draft_step = forward_seconds(target, 1), forward_seconds(draft, 1)
    verify = forward_seconds(target, num_verify_tokens)
    return dict(target_step_seconds=target_step, draft_step_seconds=draft_step, cost_ratio=draft_step / target_step,
                verify_seconds=verify, verify_cost_ratio=verify / target_step)


expected_tokens_per_round = expected_tokens  # E[τ] for i.i.d. per-token acceptance α (one formula: schedule.py)


def theoretical_speedup(acceptance_rate: float, num_draft_tokens: int, cost_ratio: float,
                        verify_cost: float = 1.0) -> float:
    """Expected walltime improvement `(1 − α^(γ+1)) / ((1 − α)(γc + 1))` (Leviathan et al. 2023).

    `verify_cost` (a γ+1-token target forward in target steps) replaces the formula's assumption that it is 1.
    """
    return expected_tokens_per_round(acceptance_rate, num_draft_tokens) / (num_draft_tokens * cost_ratio + verify_cost)


def per_token_acceptance(mean_accepted_length: float, num_draft_tokens: int) -> float:
    """The per-token α whose E[τ] equals the measured τ.

    The formula's α is the chance that one draft token is accepted given the ones before it were. Accepted/drafted
    is smaller (tokens drafted after a rejection count as drafted, never as accepted: with α = 0.9 and γ = 6 it is
    0.70), so plugging it in would understate the theory. E[τ] increases with α, so bisection inverts it.
    """
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_tokens_per_round(middle, num_draft_tokens) < mean_accepted_length \
            else (low, middle)
    return (low + high) / 2


def machine_description(device: str) -> dict:
    import transformers

    description = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), device=device,
        load_average_start=load_average(),
    )
    if str(device).startswith("cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def load_average() -> list[float] | None:
    """Other processes skew every timing; the load average says how busy the machine was."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (fraction in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ops that make the host wait for the device (on a CPU they are cheap, but they still count)
# (`.item()`, `bool()`, `int()` all end in `_local_scalar_dense`, counted once)
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select")


def round_profile(generate) -> tuple[dict, object]:
    """Run `generate()` (one speculative generate call) under torch.profiler with the engine's phases marked;
    returns ({phase: (cpu_ms, top-level aten ops, host-synchronising ops, of those ops the ones inside model calls)}
    over the whole call, its output). The ops outside model calls are the loop's overhead."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    from ..stats import PHASES, profiled_phases

    with profiled_phases(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = generate()
    milliseconds, ops, syncs, model_ops = (collections.Counter() for _ in range(4))
    names = {f"spec::{name}" for name in (*PHASES, "draft_forward")}
    for event in prof.events():
        if event.name in names:
            if event.name != "spec::draft_forward":
                milliseconds[event.name[6:]] += event.cpu_time_total / 1e3
            continue
        if not event.name.startswith("aten::"):
            continue
        phase, in_model, parent = "other", False, event.cpu_parent
        while parent is not None:
            in_model |= parent.name == "spec::model_call"
            if parent.name in names and parent.name != "spec::draft_forward":
                phase = parent.name[6:]
                break
            parent = parent.cpu_parent
        top_level = event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")
        ops[phase] += top_level
        model_ops[phase] += top_level and in_model
        syncs[phase] += event.name in SYNC_OPS
    phases = {phase: (milliseconds[phase], ops[phase], syncs[phase], model_ops[phase]) for phase in [*PHASES, "other"]}
    return phases, out
