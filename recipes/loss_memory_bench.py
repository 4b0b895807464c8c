"""Peak memory of the drafter trainers' loss, per trainer and divergence, in units of N·V·4 bytes.

N is the number of trained tokens (B·(T − 1): random ids, labels = input_ids, every token trained) and V the
vocabulary; N·V·4 bytes is one float32 [N, V] logits tensor. The models are tiny in width (Llama, hidden 64, 1-2
layers) and wide in vocabulary, so that the [N, V]-sized tensors of the loss dominate. For each case the benchmark
builds the trainer with minimal args (tmp output_dir, report_to="none", use_cpu=True, lmbda=0), prepares the model
with the trainer's accelerator as `Trainer.train` does (under `--bf16` that wraps every forward in bf16 autocast
and casts its outputs to float32, and the teacher / reference / target are bf16 models), runs one unmeasured
warm-up step, then measures

    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=count)
    loss.backward()

and reports the peak of the CPU memory allocated during it ABOVE what was live just before (weights, batch,
metric totals; parameter gradients are set to None first, so the step's own gradients count, as in training with
`zero_grad(set_to_none=True)`), in units of N·V·4 bytes and in MiB, plus the same unit figure extrapolated to
V = 151,936 and T = 4,096 (units × N'·V'·4 bytes at those sizes, in GiB) and the wall time of the step.

How memory is measured (two trackers; `--self-check` verifies both):

- The headline peak comes from `torch.profiler` with `profile_memory=True`: PyTorch's CPU allocator reports every
  allocation and free (bytes, timestamp) to the profiler, so the running sum of those events, sorted by time, is
  the exact allocated-bytes curve, including the scratch tensors that kernels allocate internally (e.g. the
  [2, N, V] `exp(x − max)` inside `logsumexp`) which no Python-level hook can see. Not included: memory that
  third-party libraries (BLAS, oneDNN) allocate with their own allocators, and allocator/malloc overhead.
- A `TorchDispatchMode` tracker (`DispatchTracker`) runs in a second, separate pass for attribution: every storage
  that a dispatched op creates (an output whose storage is not one of the op's inputs' storages) is counted with
  its nbytes and a `weakref.finalize` on the storage (PyTorch keeps one Python object per storage) subtracts it
  when it is freed; views and in-place ops share their input's storage and add nothing (a storage that grows in
  place, e.g. `resize_`, adds the difference). Autograd's backward on CPU runs on the calling thread, inside the
  mode, so backward ops are seen too. It cannot see allocations inside a kernel, so its peak is a lower bound of
  the profiler's; at its own peak it lists the live [N, V]-sized tensors (≥ half of N·V elements), which op made
  each (and, in backward, for which autograd node), their dtype and shape: the "[N,V] alive" column.

The `trainers` package is imported from `sys.path` as given (set PYTHONPATH, or pass `--code DIR`); the repository
this file lives in is only a fallback at the end of the path. The report header names the imported package's file
and the git commit of its checkout (with "+dirty" when its trainers/ has uncommitted changes).

Usage:

    python recipes/loss_memory_bench.py --self-check                # verify the trackers, then exit
    python recipes/loss_memory_bench.py --vocab 32000 --tokens 2048 --output /tmp/loss_memory.json
    python recipes/loss_memory_bench.py --bf16 --trainers distill adaspec --divergences forward_kl jsd
    PYTHONPATH=/tmp/wt-before python recipes/loss_memory_bench.py --output /tmp/loss_memory_before.json
    python recipes/loss_memory_bench.py --chunk-size 1024           # sets `loss_chunk_size` where a config has it
    python recipes/loss_memory_bench.py --tokens-for eagle3=512     # fewer tokens for one trainer

Trainers (`--trainers`): distill, distill_ce (forward KL + ce_weight 1), adaspec, soft (two exits, cross-entropy,
no teacher), soft_teacher (two exits against a teacher), guided, eagle3 (fresh head over the whole vocabulary,
the default 7 TTT steps). Divergences (`--divergences`): forward_kl reverse_kl jsd tvd, or `auto` (the default:
all four for distill, forward_kl for the others). The markdown table goes to stdout and next to the JSON (.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("distill", "distill_ce", "adaspec", "soft", "soft_teacher", "guided", "eagle3")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
EXTRAPOLATE_VOCAB, EXTRAPOLATE_TOKENS = 151_936, 4_096
HIDDEN = 64
MIB, GIB = 2**20, 2**30


# ----- trackers ---------------------------------------------------------------------------------------------------


class ProfilerTracker:
    """Exact allocated-bytes curve from the CPU allocator's reports to `torch.profiler` (see the module docstring).

    After the block: `peak` and `final` bytes relative to its start, and `peak_op` (the innermost op running when
    the peak was reached, with the autograd node when in backward)."""

    def __init__(self):
        self.peak = self.final = 0
        self.peak_op = ""
        self.events = 0

    def __enter__(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto logs profiler_start / profiler_stop lines on fd 2
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        with _quiet_stderr():
            self._profile.__exit__(*exc)
        if exc[0] is not None:
            return False
        events = list(self._profile.profiler.kineto_results.events())
        memory = [e for e in events if e.name() == "[memory]" and "CPU" in str(e.device_type())]
        memory = [e for _, e in sorted(enumerate(memory), key=lambda pair: (pair[1].start_ns(), pair[0]))]
        current, peak, peak_ns = 0, 0, None
        for event in memory:
            current += event.nbytes()
            if current > peak:
                peak, peak_ns = current, event.start_ns()
        self.peak, self.final, self.events = peak, current, len(memory)
        if peak_ns is not None:
            self.peak_op = self._op_at(events, peak_ns)
        del self._profile
        return False

    @staticmethod
    def _op_at(events, ns: int) -> str:
        around = [e for e in events if e.name() != "[memory]" and e.start_ns() <= ns <= e.end_ns()]
        ops = [e for e in around if e.name().startswith("aten::")]
        nodes = [e for e in around if e.name().startswith("autograd::engine::evaluate_function: ")]
        op = min(ops, key=lambda e: e.end_ns() - e.start_ns()).name() if ops else "?"
        if nodes:
            node = min(nodes, key=lambda e: e.end_ns() - e.start_ns()).name().split(": ", 1)[1]
            op += f" (bwd {node})"
        return op


class DispatchTracker(TorchDispatchMode):
    """Bytes of the storages created by dispatched ops while the mode is active, freed through `weakref.finalize`
    on the storage (see the module docstring). `large_elements`: storages of at least that many elements are
    listed (`at_peak`) when the current total reaches a new peak."""

    def __init__(self, large_elements: int | None = None):
        super().__init__()
        self.current = self.peak = 0
        self.live: dict[int, list] = {}  # id(storage) -> [nbytes, label]
        self.large: dict[int, tuple] = {}  # id(storage) -> (nbytes, elements, dtype, shape, label)
        self.large_elements = large_elements
        self.at_peak: list[tuple] = []

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
        self.large.pop(key, None)

    def _add(self, key: int, nbytes: int) -> None:
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            if self.large_elements is not None:
                self.at_peak = list(self.large.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        out = func(*args, **kwargs)
        node = _current_autograd_node()
        for tensor in tree_flatten(out)[0]:
            if not _has_storage(tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in self.live:  # in place or a view of a storage made here: grown only by a resize
                grown = nbytes - self.live[key][0]
                if grown:
                    self.live[key][0] = nbytes
                    self._add(key, grown)
                continue
            if key in inputs or nbytes == 0:  # a view / in-place result of a storage from before the mode
                continue
            label = func.__name__ if node is None else f"{func.__name__} (bwd {node.name()})"
            self.live[key] = [nbytes, label]
            elements = nbytes // tensor.element_size()
            if self.large_elements is not None and elements >= self.large_elements:
                dtype = str(tensor.dtype).replace("torch.", "")
                self.large[key] = (nbytes, elements, dtype, tuple(tensor.shape), label)
            weakref.finalize(storage, self._free, key)
            self._add(key, nbytes)
        return out


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _has_storage(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_sparse


def _current_autograd_node():
    current = getattr(torch._C, "_current_autograd_node", None)
    return current() if current is not None else None


# ----- self-check -------------------------------------------------------------------------------------------------


def self_check(n: int = 512, v: int = 4096) -> bool:
    """Known cases, each with an exact expected peak / final in units of n·v·4 bytes, for both trackers."""
    unit = n * v * 4
    results = []

    def case(name, body, expected_peak, expected_final, trackers=("profiler", "dispatch")):
        for which in trackers:
            gc.collect()
            state = body("setup")
            tracker = ProfilerTracker() if which == "profiler" else DispatchTracker()
            with tracker:
                kept = body("run", state)  # still alive when the block ends: counted in `final`
            final = tracker.final if which == "profiler" else tracker.current
            peak = tracker.peak
            del state, kept
            gc.collect()
            want_peak = expected_peak[which] if isinstance(expected_peak, dict) else expected_peak
            want_final = expected_final[which] if isinstance(expected_final, dict) else expected_final
            ok = abs(peak / unit - want_peak) < 1e-3 and abs(final / unit - want_final) < 1e-3
            results.append(ok)
            print(f"  {'ok  ' if ok else 'FAIL'} {which:8s} {name}: peak {peak / unit:.4f} (expected {want_peak}), "
                  f"end {final / unit:.4f} (expected {want_final})")

    def softmax(stage, state=None):
        if stage == "setup":
            return None
        x = torch.empty(n, v)
        y = torch.softmax(x, -1)
        return x, y  # both alive at the end of the block

    def views_and_in_place(stage, state=None):
        if stage == "setup":
            return torch.randn(n, v)  # before the tracker: its views and in-place updates cost nothing
        x = state
        x.mul_(2).add_(1)
        view = x[:, : v // 2].t()
        copy_ = view.contiguous()  # +0.5
        y = torch.empty(n, v)
        y.copy_(x)  # +1
        z = y.view(-1)[:10]
        z.zero_()
        return copy_, y

    def backward(stage, state=None):
        if stage == "setup":
            return torch.randn(n, v, requires_grad=True)
        # forward: exp(x) (+1, saved for backward): 1. Backward, on this thread: grad · exp(x) (+1) while the saved
        # exp(x) is alive: 2 (a tracker that missed backward would say 1); the graph is freed and the gradient
        # becomes x.grad without a copy: 1 at the end
        loss = state.exp().sum()
        loss.backward()
        return None

    def logsumexp(stage, state=None):
        if stage == "setup":
            return torch.randn(2, n, v)
        with torch.no_grad():
            # inside the kernel: amax [n, v] (+1), x − max [2, n, v] (+2, exp_ in place), its sum (+1): peak 4,
            # then all but the result freed. Only the allocator sees the inside; the dispatch mode sees the result.
            return torch.logsumexp(state, 0)

    def autocast_linear(stage, state=None):
        if stage == "setup":
            return torch.randn(n, 64), torch.nn.Linear(64, v, bias=False)
        x, linear = state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = linear(x)  # bf16 [n, v] (0.5), from bf16 casts of x (saved for the weight's grad) and weight
        # the weight's cast dies with autocast's cache at the block's end; .float() (+1) while the bf16 logits
        # live: peak 1.5 + x's cast; then the bf16 logits are freed (the cast's backward does not need them)
        return logits.float()

    print(f"self-check: units of n·v·4 bytes, n={n}, v={v} ({unit / MIB:.1f} MiB)")
    case("[n, v] float32 and its softmax", softmax, 2.0, 2.0)
    case("views and in-place ops of a storage from before, then a copy of a half and a full [n, v]", views_and_in_place,
         1.5, 1.5)
    case("autograd: x.exp().sum().backward(), x a leaf from before", backward, 2.0, 1.0)
    # the profiler sees the kernel-internal temporaries, the dispatch mode only the [n, v] output
    case("logsumexp over [2, n, v] (no grad)", logsumexp, {"profiler": 4.0, "dispatch": 1.0}, 1.0)
    x_cast = n * 64 * 2 / unit  # x's bf16 copy, saved by the graph of the returned logits
    case("bf16 autocast linear to [n, v], then .float()", autocast_linear, 1.5 + x_cast, 1.0 + x_cast)
    ok = all(results)
    print("self-check:", "passed" if ok else "FAILED")
    return ok


# ----- models and trainers ----------------------------------------------------------------------------------------


def llama(vocab: int, layers: int, tokens: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(tokens, 128),
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def config_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def build_trainer(name: str, divergence: str, vocab: int, tokens: int, bf16: bool, chunk_size: int | None,
                  output_dir: str):
    """The trainer of one case and whether `chunk_size` reached its config."""
    import trainers

    frozen_dtype = torch.bfloat16 if bf16 else torch.float32

    def teacher(layers=2, seed=1):
        return llama(vocab, layers, tokens, seed).to(frozen_dtype)

    common = dict(output_dir=output_dir, report_to="none", use_cpu=True, bf16=bf16, disable_tqdm=True,
                  save_strategy="no", per_device_train_batch_size=1, dataloader_pin_memory=False, seed=0,
                  max_length=tokens)
    if name != "soft":
        common["divergence"] = divergence

    def args(config_class, **fields):
        settings = {**common, **fields}
        applied = False
        if chunk_size is not None and "loss_chunk_size" in config_fields(config_class):
            settings["loss_chunk_size"] = chunk_size
            applied = True
        return config_class(**settings), applied

    if name in ("distill", "distill_ce"):
        config, applied = args(trainers.DistillConfig, lmbda=0.0, ce_weight=1.0 if name == "distill_ce" else 0.0)
        trainer = trainers.DistillTrainer(model=llama(vocab, 1, tokens, 0), teacher_model=teacher(), args=config)
    elif name == "adaspec":
        config, applied = args(trainers.AdaSPECConfig, lmbda=0.0)
        student = llama(vocab, 1, tokens, 0)
        reference = copy.deepcopy(student).to(frozen_dtype)
        trainer = trainers.AdaSPECTrainer(model=student, teacher_model=teacher(), ref_model=reference, args=config)
    elif name in ("soft", "soft_teacher"):
        config, applied = args(trainers.SoFTConfig, exits=[1, 2])
        trainer = trainers.SoFTTrainer(model=llama(vocab, 2, tokens, 0), args=config,
                                       teacher_model=teacher(3) if name == "soft_teacher" else None)
    elif name == "guided":
        config, applied = args(trainers.GuidedDrafterConfig, verifier_layers=[1, 2], draft_length=4)
        trainer = trainers.GuidedDrafterTrainer(model=llama(vocab, 1, tokens, 0), teacher_model=teacher(), args=config)
    elif name == "eagle3":
        config, applied = args(trainers.Eagle3TrainingConfig, aux_hidden_state_layer_ids=[1, 2])
        trainer = trainers.Eagle3Trainer(model=None, teacher_model=teacher(), args=config)
    else:
        raise ValueError(f"unknown trainer {name!r}; choose from {TRAINERS}")
    return trainer, applied


def make_batch(vocab: int, tokens: int, batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, vocab, (batch_size, tokens), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


# ----- one case ---------------------------------------------------------------------------------------------------


def loss_step(trainer, model, batch, count) -> float:
    """One compute_loss + backward, as `Trainer.training_step` runs them; returns the loss."""
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=count)
    loss.backward()
    return float(loss.detach())


def reset(trainer, model) -> None:
    model.zero_grad(set_to_none=True)
    for totals in getattr(trainer, "_metric_totals", {}).values():
        totals.clear()
    gc.collect()


def run_case(name: str, divergence: str, vocab: int, tokens: int, batch_size: int, bf16: bool,
             chunk_size: int | None, attribute: bool) -> dict:
    n = batch_size * (tokens - 1)
    unit = n * vocab * 4
    row = {"trainer": name, "divergence": "ce" if name == "soft" else divergence, "bf16": bf16, "vocab": vocab,
           "tokens": tokens, "batch_size": batch_size, "n": n, "unit_bytes": unit}
    with tempfile.TemporaryDirectory(prefix="loss-memory-") as output_dir:
        trainer, applied = build_trainer(name, divergence, vocab, tokens, bf16, chunk_size, output_dir)
        row["chunk_size"] = chunk_size if applied else None
        trainer.model.train()
        model = trainer.accelerator.prepare(trainer.model)  # as Trainer.train: bf16 autocast around the forward
        trainer.model_wrapped = model
        batch = make_batch(vocab, tokens, batch_size)
        count = trainer.count_loss_tokens(batch)
        reset(trainer, model)
        start = time.perf_counter()
        row["loss"] = loss_step(trainer, model, batch, count)  # warm-up: lazy buffers, metric totals
        row["warmup_s"] = time.perf_counter() - start

        reset(trainer, model)
        profiler = ProfilerTracker()
        start = time.perf_counter()
        with profiler:
            loss_step(trainer, model, batch, count)
        row["profiled_s"] = time.perf_counter() - start
        row.update(peak_bytes=profiler.peak, retained_bytes=profiler.final, peak_op=profiler.peak_op,
                   units=profiler.peak / unit, peak_mib=profiler.peak / MIB, retained_units=profiler.final / unit)
        row["extrapolated_gib"] = row["units"] * batch_size * (EXTRAPOLATE_TOKENS - 1) * EXTRAPOLATE_VOCAB * 4 / GIB

        if attribute:
            reset(trainer, model)
            dispatch = DispatchTracker(large_elements=n * vocab // 2)
            with dispatch:
                loss_step(trainer, model, batch, count)
            big = sorted(dispatch.at_peak, key=lambda entry: -entry[0])
            row.update(dispatch_units=dispatch.peak / unit, nv_count=len(big),
                       nv_units=sum(entry[0] for entry in big) / unit,
                       nv_tensors=[{"dtype": d, "shape": list(s), "units": round(b / unit, 3), "op": label}
                                   for b, _, d, s, label in big])
        del trainer, model, batch
    gc.collect()
    return row


# ----- report -----------------------------------------------------------------------------------------------------


def code_origin() -> dict:
    import trainers

    folder = Path(trainers.__file__).resolve().parent
    origin = {"trainers_file": str(Path(trainers.__file__).resolve())}
    try:
        git = ["git", "-C", str(folder)]
        origin["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               check=True).stdout.strip()
        origin["dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        origin["commit"], origin["dirty"] = None, None
    return origin


def case_label(row: dict) -> str:
    names = {"distill": "Distill", "distill_ce": "Distill + CE", "adaspec": "AdaSPEC", "soft": "SoFT (CE)",
             "soft_teacher": "SoFT + teacher", "guided": "Guided (SD²)", "eagle3": "EAGLE-3 (7 TTT)"}
    return names.get(row["trainer"], row["trainer"])


def precision(row: dict) -> str:
    return "bf16 autocast" if row.get("bf16") else "fp32"


def markdown(header: dict, rows: list[dict]) -> str:
    origin = header["code"]
    commit = f"{origin['commit']}{'+dirty' if origin['dirty'] else ''}" if origin.get("commit") else "unknown"
    title = (f"Loss peak memory — trainers from `{origin['trainers_file']}` (commit {commit}); "
             f"torch {header['torch']}, transformers {header['transformers']}, {header['threads']} threads; "
             f"V = {header['vocab']}, batch {header['batch_size']}, loss_chunk_size {header['chunk_size']}.")
    legend = ("units: peak allocated above the live memory before `compute_loss`, through `backward`, in N·V·4 "
              "bytes (N = trained tokens; exact, from the CPU allocator via torch.profiler). retained: still "
              "allocated after backward (the step's gradients). [N,V] alive: tensors of ≥ N·V/2 elements live at "
              "the dispatch-mode tracker's peak (count, units per dtype); dispatch units: that tracker's peak "
              "(misses in-kernel scratch). GiB: units × N·V·4 at "
              f"V = {EXTRAPOLATE_VOCAB}, T = {EXTRAPOLATE_TOKENS}. s: wall time of the profiled step.")
    columns = ("| precision | trainer | divergence | T | units (N·V·4) | peak MiB | retained units | "
               "[N,V] alive (dispatch) | dispatch units | GiB @152k×4096 | op at peak | s |")
    lines = [title, "", legend, "", columns, "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {precision(row)} | {case_label(row)} | {row['divergence']} | {row['tokens']} | "
                         f"error: {row['error']} | | | | | | | |")
            continue
        alive = ""
        if "nv_count" in row:
            kinds: dict[str, float] = {}
            for tensor in row["nv_tensors"]:
                kinds[tensor["dtype"]] = kinds.get(tensor["dtype"], 0) + tensor["units"]
            alive = f"{row['nv_count']} ({', '.join(f'{k} {v:.2f}' for k, v in kinds.items())})"
        dispatch = f"{row['dispatch_units']:.2f}" if "dispatch_units" in row else ""
        lines.append(
            f"| {precision(row)} | {case_label(row)} | {row['divergence']} | {row['tokens']} | **{row['units']:.2f}** | "
            f"{row['peak_mib']:.0f} | {row['retained_units']:.2f} | {alive} | {dispatch} | "
            f"{row['extrapolated_gib']:.1f} | `{row['peak_op']}` | {row['profiled_s']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-check", action="store_true", help="verify the memory trackers on known cases, exit")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per row T (N = batch·(T − 1))")
    parser.add_argument("--tokens-for", nargs="*", default=[], metavar="TRAINER=T",
                        help="a different T for some trainers, e.g. eagle3=512 (the unit figure is size-independent)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--divergences", nargs="+", default=["auto"], choices=["auto", *DIVERGENCES])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (accelerate) and bf16 frozen models; "
                        "the same as --precisions bf16")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="run every case in each of these (default: fp32, or bf16 with --bf16)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="sets `loss_chunk_size` on configs that have that field (recorded per row)")
    parser.add_argument("--no-attribution", action="store_true", help="skip the dispatch-mode pass")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--code", default=None, help="import `trainers` (and hf_specdec) from this folder first")
    parser.add_argument("--output", default=None, help="JSON file; the markdown table goes next to it (.md)")
    return parser.parse_args(argv)


def cases(args) -> list[tuple[str, str]]:
    chosen = []
    for name in args.trainers:
        if name == "soft":
            chosen.append((name, "forward_kl"))  # no teacher: cross-entropy, the divergence is unused
        elif args.divergences == ["auto"]:
            chosen += [(name, d) for d in (DIVERGENCES if name == "distill" else ("forward_kl",))]
        else:
            chosen += [(name, d) for d in args.divergences if d != "auto"]
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.self_check:
        return 0 if self_check() else 1
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    sys.path.append(str(REPO))  # a fallback only: PYTHONPATH / --code come first
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokens_for = dict(item.split("=", 1) for item in args.tokens_for)
    precisions = args.precisions or (["bf16"] if args.bf16 else ["fp32"])
    header = {"code": code_origin(), "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "threads": torch.get_num_threads(), "precisions": precisions,
              "vocab": args.vocab, "tokens": args.tokens, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
              "extrapolate_to": {"vocab": EXTRAPOLATE_VOCAB, "tokens": EXTRAPOLATE_TOKENS}}
    origin = header["code"]
    print(f"trainers: {origin['trainers_file']} (commit {origin.get('commit')}"
          f"{', dirty' if origin.get('dirty') else ''})", flush=True)
    rows = []
    for precision in precisions:
        for name, divergence in cases(args):
            tokens = int(tokens_for.get(name, args.tokens))
            start = time.perf_counter()
            bf16 = precision == "bf16"
            try:
                row = run_case(name, divergence, args.vocab, tokens, args.batch_size, bf16, args.chunk_size,
                               attribute=not args.no_attribution)
            except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
                message = str(error).splitlines()[0][:200] if str(error) else ""
                row = {"trainer": name, "divergence": divergence, "bf16": bf16, "tokens": tokens,
                       "error": f"{type(error).__name__}: {message}"}
            row["case_s"] = time.perf_counter() - start
            rows.append(row)
            summary = row.get("error") or f"{row['units']:.2f} × N·V·4 = {row['peak_mib']:.0f} MiB"
            if "dispatch_units" in row:
                summary += f" (dispatch {row['dispatch_units']:.2f}, [N,V] alive {row['nv_count']})"
            print(f"  {precision} {name:12s} {row['divergence']:10s} T={tokens}: {summary}  [{row['case_s']:.0f} s]",
                  flush=True)
    table = markdown(header, rows)
    print()
    print(table)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n", encoding="utf-8")
        output.with_suffix(".md").write_text(table, encoding="utf-8")
        print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
