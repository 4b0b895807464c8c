"""The lab: a reproducible comparison of drafter training methods, from local text only.

From a directory of text (by default the Python standard library's source on this machine) it builds, in order:

1. `corpus/`    the files, split into train / held-out by a hash of each file's relative path;
2. `tokenizer/` a byte-level BPE tokenizer trained on the train split;
3. `data/`      train and held-out blocks of `block_length` tokens;
   `prompts/`   held-out prompts for the benchmark (`heldout.jsonl`, also copied to the output dir);
4. `target/`    a small Llama trained with a plain `Trainer` (causal LM loss) — the model to speed up;
5. `drafters/<name>/`, all from the same initial draft weights (`init`, kept as a baseline row):
   `sft` (cross-entropy on the text, no teacher), `distill-fkl` / `distill-tvd` (DistillTrainer, forward KL /
   total variation against the target), `adaspec` (AdaSPECTrainer, k = 0.4, reference = `distill-fkl`, trained
   `distill_fkl_steps / k` steps as the paper scales epochs), `distill-fkl-long` (forward KL for as many steps
   as AdaSPEC: the compute-matched control), `soft` (SoFTTrainer: the target's first layers, several exits),
   `guided` (GuidedDrafterTrainer, SD²: `init` steered by the target's hidden states) and `eagle3` (Eagle3Trainer:
   an EAGLE-3 head over the target's hidden states and embedding).

Each stage lives in its own folder with a `lab_stage.json` marker holding a hash of exactly the settings that
determine it and the hashes of its inputs: a second run with the same settings reuses everything and only
measures; a changed setting rebuilds that stage and what depends on it. Then it measures every drafter: held-out
expected acceptance Σ min(p, q) and top-1 agreement against the target, and real speculative decoding through the
benchmark suite (`hf_specdec.bench.run_suite`: plain / chain / tree × greedy / sampling on the held-out prompts),
and writes `lab_report.md` / `lab_report.json`.

With `domains` (a mapping name -> sources, e.g. `code` = the standard library, `prose` = package descriptions and
documentation) the corpus is several domains instead of one directory: every corpus row, data block
(`data/train-<domain>.pt`) and held-out prompt (`category` = the domain, as many per domain) keeps its domain; the
tokenizer and target learn all of them; `distill-<domain>` drafters train on one domain each and `distill-all` on
an equal mix, and acceptance is measured per domain (a drafter × domain table). Unset, the lab is single-domain and
every stage's key is what it always was.

    python recipes/lab.py --config recipes/configs/lab.yaml               # the full lab (~35 min on 2 CPU cores)
    python recipes/lab.py --config recipes/configs/lab_tiny.yaml          # every stage at toy sizes (~1 min)
    python recipes/lab.py --config recipes/configs/lab_domains.yaml --benchmark false  # code + prose (~15 min)
    python recipes/lab.py --config recipes/configs/lab.yaml --text_dir ~/src/myproject --output_dir out/lab-mine
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common` when imported from elsewhere (tests)

from _common import parse_args

from trainers.data import DraftDataCollator

MARKER = "lab_stage.json"
LAB_VERSION = 2  # bump when a stage's code changes what it produces, so old caches are rebuilt
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
DRAFTERS = ("init", "sft", "distill-fkl", "distill-tvd", "adaspec", "distill-fkl-long", "soft", "guided", "eagle3")
METHODS = {
    "init": "untrained initial draft (baseline)",
    "sft": "SFT: cross-entropy on the text, no teacher",
    "distill-fkl": "DistillTrainer, forward KL (DistillSpec; AdaSPEC's reference)",
    "distill-tvd": "DistillTrainer, total variation (DistillSpec)",
    "adaspec": "AdaSPECTrainer, k = {k}, steps / k",
    "distill-fkl-long": "DistillTrainer, forward KL, AdaSPEC's step count",
    "soft": "SoFTTrainer: target's first {layers} layers, exits {exits}",
    "guided": "GuidedDrafterTrainer (SD²): init steered by target states {states}, forward KL",
    "eagle3": "Eagle3Trainer: 1-layer head on target states {states}, {ttt} TTT steps, {vocab} draft vocabulary",
}
# Domain drafters are `distill-<domain>`, so a domain may not be named like the other distillation drafters' suffixes.
DOMAIN_NAME = re.compile(r"[a-z0-9_]+")
RESERVED_DOMAINS = ("fkl", "tvd", "all")
DOMAIN_KEYS = ("sources", "exclude", "max_file_kb", "max_mb", "prompt_start")
PROMPT_STARTS = ("def", "paragraph")
# Files whose first lines say they were generated (codec tables, parser tables, ...) teach nothing about code.
GENERATED = re.compile(r"auto-?generated|generated (by|from|with)|do not edit", re.IGNORECASE)
PROMPT_START = re.compile(r"^[ \t]*(async\s+def|def|class)\s", re.MULTILINE)
# A paragraph of prose: a line that starts with a capital letter after a blank line (not a heading, list or table).
PARAGRAPH_START = re.compile(r"(?:\A|\n[ \t]*\n)(?=[A-Z])")
# Licence texts are the most repeated prose on any machine (hundreds of identical copies): a domain drops a licence
# header (a leading comment) and skips files that still start with one, instead of teaching drafters to recite them.
LEADING_COMMENT = re.compile(r"\A\s*(?:<!--.*?-->|(?:[ \t]*(?:#[^\n]*)?\n)+)", re.DOTALL)
LICENCE = re.compile(
    r"permission is hereby granted|redistribution and use in source and binary forms|licensed under the apache "
    r"license|gnu (lesser |library )?general public license|the software is provided .as is.|all rights reserved",
    re.IGNORECASE,
)


@dataclass
class LabArguments:
    """Every setting of the lab. Sizes default to what trains in ~35 minutes on a 2-core CPU (see docs/lab.md)."""

    # ----- text
    text_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of text files to learn from. Default: the Python standard library's source "
                  "(sysconfig.get_paths()['stdlib'])."},
    )
    file_glob: str = field(default="*.py", metadata={"help": "Which files under text_dir to read (recursively)."})
    exclude_dirs: list[str] = field(
        default_factory=lambda: ["site-packages", "dist-packages", "__pycache__"],
        metadata={"help": "Skip files under a directory with one of these names (third-party packages)."},
    )
    max_file_kb: int = field(
        default=256, metadata={"help": "Skip files larger than this (data tables, huge generated modules)."}
    )
    max_corpus_mb: float = field(
        default=16.0,
        metadata={"help": "Cap on the total text read; files are taken in a fixed pseudo-random order (hash of the "
                  "relative path) until the cap."},
    )
    heldout_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of files held out (split by a hash of the relative path, so it is deterministic "
                  "and a file is never in both splits). In (0, 1)."},
    )
    domains: dict | str | None = field(
        default=None,
        metadata={"help": "Learn from several domains of text instead of text_dir (which must then be unset): a "
                  "mapping name -> {sources: [glob patterns of files, `**` for any depth; '{stdlib}' and '{purelib}' "
                  "expand to this Python's standard library and site-packages], exclude: [fnmatch patterns of file or "
                  "directory names to skip] (default: exclude_dirs), max_file_kb (default: max_file_kb), max_mb: the "
                  "domain's cap (default: max_corpus_mb), prompt_start: 'def' (held-out prompts start at a def / "
                  "class line) or 'paragraph' (at a paragraph of prose)}. Every corpus row, block and held-out prompt "
                  "is labelled with its domain; drafters `distill-<name>` train on one domain each and `distill-all` "
                  "on an equal mix; acceptance is measured per domain. On the command line: JSON. Unset: one domain, "
                  "text_dir, exactly as before."},
    )
    output_dir: str = field(default="out/lab", metadata={"help": "Where every stage and the report are written."})
    # ----- tokenizer and data
    vocab_size: int = field(default=2048, metadata={"help": "Byte-level BPE vocabulary size (incl. special tokens)."})
    block_length: int = field(default=256, metadata={"help": "Tokens per training block (files are packed)."})
    eval_blocks: int = field(
        default=128, metadata={"help": "Held-out blocks on which the target's loss and the drafters' acceptance are "
                               "measured (every run; not part of any stage). With domains: this many of each domain."}
    )
    num_prompts: int = field(
        default=32, metadata={"help": "Held-out prompts written to heldout.jsonl. With domains: as many of each "
                              "domain (so a multiple of the number of domains)."}
    )
    prompt_min_tokens: int = field(default=48, metadata={"help": "Shortest held-out prompt, in tokens."})
    prompt_max_tokens: int = field(default=96, metadata={"help": "Longest held-out prompt, in tokens."})
    prompt_category: str = field(
        default="python",
        metadata={"help": "Category name of the held-out prompts. With domains: unused (a prompt's category is its "
                  "domain)."},
    )
    # ----- target
    target_hidden_size: int = field(default=256, metadata={"help": "Target: hidden size."})
    target_layers: int = field(default=4, metadata={"help": "Target: decoder layers."})
    target_heads: int = field(default=4, metadata={"help": "Target: attention heads (as many KV heads)."})
    target_intermediate_size: int = field(default=768, metadata={"help": "Target: MLP width."})
    target_steps: int = field(default=560, metadata={"help": "Target: optimizer steps."})
    target_max_minutes: float | None = field(
        default=None,
        metadata={"help": "Target: stop training after this many minutes even before target_steps (then the result "
                  "depends on the machine's speed)."},
    )
    target_learning_rate: float = field(default=3e-3, metadata={"help": "Target: peak learning rate (cosine)."})
    batch_size: int = field(default=16, metadata={"help": "Target: blocks per optimizer step."})
    # ----- drafters
    drafters: list[str] = field(
        default_factory=lambda: list(DRAFTERS),
        metadata={"help": f"Which drafters to build and measure, from {list(DRAFTERS)}, and with domains also "
                  "`distill-<domain>` (forward KL like distill-fkl, on that domain's blocks only) and `distill-all` "
                  "(the same on an equal mix of the domains). `adaspec` also builds `distill-fkl` (its reference)."},
    )
    draft_hidden_size: int = field(default=128, metadata={"help": "Draft: hidden size."})
    draft_layers: int = field(default=2, metadata={"help": "Draft: decoder layers."})
    draft_heads: int = field(default=4, metadata={"help": "Draft: attention heads (as many KV heads)."})
    draft_intermediate_size: int = field(default=384, metadata={"help": "Draft: MLP width."})
    draft_learning_rate: float = field(default=3e-3, metadata={"help": "Drafters: peak learning rate (cosine)."})
    draft_batch_size: int = field(default=8, metadata={"help": "Drafters: blocks per optimizer step."})
    draft_train_blocks: int = field(
        default=1200,
        metadata={"help": "Drafters: their training set, this many train blocks drawn at random (seeded) from the "
                  "target's. With the defaults 150 steps × 8 blocks is one epoch, so AdaSPEC's steps / k is the "
                  "paper's epochs / k."},
    )
    sft_steps: int = field(default=150, metadata={"help": "`sft`: optimizer steps."})
    distill_fkl_steps: int = field(default=150, metadata={"help": "`distill-fkl`: optimizer steps."})
    distill_tvd_steps: int = field(default=150, metadata={"help": "`distill-tvd`: optimizer steps."})
    distill_lmbda: float = field(
        default=0.0,
        metadata={"help": "On-policy fraction of the distillation drafters (DistillConfig.lmbda). 0 keeps every "
                  "drafter on the same data, as AdaSPEC's DistillSpec baseline does; > 0 makes the first half of "
                  "each block the prompt that on-policy samples continue."},
    )
    adaspec_k: float = field(default=0.4, metadata={"help": "`adaspec`: fraction of tokens trained on (paper: 0.4)."})
    adaspec_steps: int | None = field(
        default=None,
        metadata={"help": "`adaspec`: optimizer steps. Default: distill_fkl_steps / k, as the paper trains its "
                  "reference's epochs / k."},
    )
    soft_layers: int = field(default=2, metadata={"help": "`soft`: the draft is the target's first N layers."})
    soft_exits: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "`soft`: exits to train."})
    soft_exit_thresholds: list[float] = field(
        default_factory=lambda: [0.7, 0.0],
        metadata={"help": "`soft`: confidence thresholds per exit that the sorted drafter stops at (last: 0)."},
    )
    soft_steps: int = field(default=150, metadata={"help": "`soft`: optimizer steps."})
    target_state_layers: list[int] | None = field(
        default=None,
        metadata={"help": "`guided` and `eagle3`: the target hidden_states indices they read (0 = embeddings, k = "
                  "output of decoder layer k - 1). Default: EAGLE-3's low / middle / high states for target_layers "
                  "(hf_specdec.eagle3.default_aux_layer_ids)."},
    )
    guided_steps: int = field(
        default=150, metadata={"help": "`guided`: optimizer steps (SD²: `init` and its guide, steered by the target's "
                               "states up to num_draft_tokens positions old, forward KL)."}
    )
    eagle3_steps: int = field(default=150, metadata={"help": "`eagle3`: optimizer steps (a fresh EAGLE-3 head)."})
    eagle3_ttt_steps: int = field(
        default=4, metadata={"help": "`eagle3`: draft steps unrolled in training (training-time test; EAGLE-3: 7)."}
    )
    eagle3_draft_vocab_size: int | None = field(
        default=1024,
        metadata={"help": "`eagle3`: the head drafts over this many of the drafters' most frequent training tokens "
                  "(+ EOS / PAD); None: the whole vocabulary."},
    )
    # ----- measuring
    benchmark: bool = field(
        default=True, metadata={"help": "Run the speculative-decoding benchmark (hf_specdec.bench.run_suite)."}
    )
    bench_prompts: int = field(default=16, metadata={"help": "Benchmark: held-out prompts used."})
    max_new_tokens: int = field(default=64, metadata={"help": "Benchmark: tokens generated per prompt."})
    num_draft_tokens: int = field(default=4, metadata={"help": "Benchmark: draft length γ of chains."})
    tree: list[int] = field(
        default_factory=lambda: [4, 2, 12], metadata={"help": "Benchmark: tree depth, top_k, max_nodes."}
    )
    bench_repeats: int = field(default=2, metadata={"help": "Benchmark: timed repeats (the median is reported)."})
    bench_threads: int | None = field(
        default=1,
        metadata={"help": "Benchmark: torch CPU threads (None: torch's default). Batch-1 decoding of models this "
                  "small is bound by per-call overhead, not arithmetic, and one thread keeps a shared machine quiet."},
    )
    # ----- how to run
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Training precision: auto (bfloat16 mixed precision on a GPU that supports it, else "
                  "float32), float32 or bfloat16.", "choices": ["auto", "float32", "bfloat16"]},
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's, one per core)."})
    seed: int = field(default=0, metadata={"help": "Seed of the models' initial weights, data order and prompts."})
    force: bool = field(default=False, metadata={"help": "Rebuild every stage even when its cache is valid."})
    logging_steps: int = field(default=25, metadata={"help": "Trainer logging interval (steps)."})

    def __post_init__(self):
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {self.heldout_fraction}.")
        self.domains = normalised_domains(self)
        unknown = sorted(set(self.drafters) - set(self.known_drafters()))
        if unknown:
            hint = (" (`distill-<domain>` and `distill-all` exist only with --domains)"
                    if not self.domains and any(name.startswith("distill-") for name in unknown) else "")
            raise ValueError(f"Unknown drafters {unknown}; choose from {self.known_drafters()}{hint}.")
        if not 0.0 < self.adaspec_k <= 1.0:
            raise ValueError(f"adaspec_k must be in (0, 1], got {self.adaspec_k}.")
        if not 1 <= self.soft_layers <= self.target_layers:
            raise ValueError(f"soft_layers must be in 1..target_layers ({self.target_layers}), got {self.soft_layers}.")
        if not self.soft_exits or self.soft_exits[-1] != self.soft_layers:
            raise ValueError(f"soft_exits must end at soft_layers ({self.soft_layers}), got {self.soft_exits}.")
        if len(self.soft_exit_thresholds) != len(self.soft_exits):
            raise ValueError(f"soft_exit_thresholds needs one value per exit ({self.soft_exits}).")
        if self.target_state_layers is not None and not all(0 <= i <= self.target_layers
                                                            for i in self.target_state_layers):
            raise ValueError(f"target_state_layers must be hidden_states indices in 0..target_layers "
                             f"({self.target_layers}), got {self.target_state_layers}.")
        if not 8 <= self.prompt_min_tokens <= self.prompt_max_tokens:
            raise ValueError("Need 8 <= prompt_min_tokens <= prompt_max_tokens.")
        if self.block_length < 16 or self.vocab_size < 300:
            raise ValueError("Need block_length >= 16 and vocab_size >= 300 (256 bytes + special tokens + merges).")
        if len(self.tree) != 3:
            raise ValueError(f"tree is depth, top_k, max_nodes; got {self.tree}.")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}.")

    @property
    def resolved_text_dir(self) -> Path:
        return Path(self.text_dir or sysconfig.get_paths()["stdlib"]).expanduser().resolve()

    @property
    def resolved_adaspec_steps(self) -> int:
        return self.adaspec_steps or math.ceil(self.distill_fkl_steps / self.adaspec_k)

    @property
    def resolved_target_state_layers(self) -> list[int]:
        from hf_specdec.eagle3 import default_aux_layer_ids

        return list(self.target_state_layers or default_aux_layer_ids(self.target_layers))

    @property
    def use_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    @property
    def bf16(self) -> bool:
        if self.dtype == "auto":
            return self.use_cuda and torch.cuda.is_bf16_supported()
        return self.dtype == "bfloat16"

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains or {})

    def domain_drafters(self) -> dict[str, list[str]]:
        """`{drafter: the domains it trains on}`: one specialist per domain, then the generalist on all of them."""
        if not self.domains:
            return {}
        return {**{f"distill-{name}": [name] for name in self.domains}, "distill-all": self.domain_names}

    def known_drafters(self) -> list[str]:
        return [*DRAFTERS, *self.domain_drafters()]

    def wanted_drafters(self) -> list[str]:
        wanted = set(self.drafters) | ({"distill-fkl"} if "adaspec" in self.drafters else set())
        return [name for name in self.known_drafters() if name in wanted]


def normalised_domains(args: LabArguments) -> dict[str, dict] | None:
    """`args.domains` checked, with every default filled in (so the corpus stage's key names every setting);
    None when unset. A string is parsed as JSON / YAML (the command line's form)."""
    domains = args.domains
    if domains is None:
        return None
    if isinstance(domains, str):
        import yaml

        domains = yaml.safe_load(domains)
    if not isinstance(domains, dict) or not domains:
        raise ValueError(f"domains must be a non-empty mapping name -> source spec, got {args.domains!r}.")
    if args.text_dir is not None:
        raise ValueError("Give either text_dir (one domain) or domains (each names its own sources), not both.")
    if args.num_prompts % len(domains):
        raise ValueError(f"num_prompts ({args.num_prompts}) must be a multiple of the number of domains "
                         f"({len(domains)}): the held-out prompts are split equally between them.")
    normalised = {}
    for name, spec in domains.items():
        if not DOMAIN_NAME.fullmatch(str(name)) or name in RESERVED_DOMAINS:
            raise ValueError(f"Domain name {name!r}: use lower-case letters, digits and _, and none of "
                             f"{list(RESERVED_DOMAINS)} (its drafter is `distill-{name}`).")
        if not isinstance(spec, dict) or set(spec) - set(DOMAIN_KEYS):
            raise ValueError(f"Domain {name!r}: a mapping with keys from {list(DOMAIN_KEYS)}, got {spec!r}.")
        sources = spec.get("sources")
        if isinstance(sources, str):
            sources = [sources]
        if not sources or not all(isinstance(s, str) for s in sources):
            raise ValueError(f"Domain {name!r} needs sources: a list of glob patterns of its files.")
        full = {"sources": list(sources), "exclude": list(spec.get("exclude", args.exclude_dirs)),
                "max_file_kb": spec.get("max_file_kb", args.max_file_kb),
                "max_mb": float(spec.get("max_mb", args.max_corpus_mb)),
                "prompt_start": spec.get("prompt_start", "def")}
        if full["max_mb"] <= 0 or full["max_file_kb"] <= 0:
            raise ValueError(f"Domain {name!r}: max_mb and max_file_kb must be positive.")
        if full["prompt_start"] not in PROMPT_STARTS:
            raise ValueError(f"Domain {name!r}: prompt_start must be one of {list(PROMPT_STARTS)}, "
                             f"got {full['prompt_start']!r}.")
        normalised[name] = full
    return normalised


def log(message: str) -> None:
    print(f"[lab {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ----- stages and their cache ---------------------------------------------------------------------------------


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(directory: Path, settings: dict, build: Callable[[Path], dict], force: bool = False) -> dict:
    """Reuse `directory` if its marker's key matches `settings` (which include the keys of the stage's inputs);
    otherwise empty it, `build(directory)` and write the marker last, so an interrupted build is never reused."""
    key = digest({"lab_version": LAB_VERSION, **settings})
    marker = directory / MARKER
    if not force and marker.exists():
        record = json.loads(marker.read_text())
        if record.get("key") == key:
            log(f"{directory.name}: cached (key {key}, built in {record['seconds']:.1f} s) — reused")
            return {**record, "reused": True}
    log(f"{directory.name}: building")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    start = time.perf_counter()
    metrics = build(directory) or {}
    seconds = time.perf_counter() - start
    record = {"stage": directory.name, "key": key, "settings": settings, "seconds": round(seconds, 2),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": metrics}
    partial = directory / (MARKER + ".partial")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, marker)
    log(f"{directory.name}: built in {seconds:.1f} s (key {key})")
    return {**record, "reused": False}


# ----- stage 1: corpus ----------------------------------------------------------------------------------------


def path_fraction(salt: str, relative: str) -> float:
    """A number in [0, 1) fixed by the file's relative path: the same split on every machine and run."""
    return int(hashlib.sha256(f"{salt}:{relative}".encode()).hexdigest()[:12], 16) / 16**12


def select_files(args: LabArguments) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """`[(relative path, text)]` of the files the corpus uses, in cap order, and counts of what was skipped."""
    root = args.resolved_text_dir
    if not root.is_dir():
        raise ValueError(f"text_dir {str(root)!r} is not a directory.")
    skipped = {"excluded_dir": 0, "too_large": 0, "empty": 0, "not_utf8": 0, "generated": 0, "over_cap": 0}
    candidates = []
    for path in root.rglob(args.file_glob):
        relative = path.relative_to(root).as_posix()
        if not path.is_file():
            continue
        if any(part in args.exclude_dirs for part in path.relative_to(root).parts[:-1]):
            skipped["excluded_dir"] += 1
            continue
        size = path.stat().st_size
        if size > args.max_file_kb * 1024:
            skipped["too_large"] += 1
            continue
        candidates.append(relative)
    selected = fill_to_cap(candidates, lambda relative: read_text_file(root / relative),
                           args.max_corpus_mb * 1024 * 1024, skipped)
    if not selected:
        raise ValueError(
            f"No usable {args.file_glob!r} files under {str(root)!r} (skipped: {skipped}). Point --text_dir at a "
            "directory with text files, or change --file_glob / --max_file_kb / --exclude_dirs."
        )
    return selected, skipped


def read_text_file(path: Path) -> tuple[str | None, str]:
    """`(text, "")`, or `(None, "not_utf8")` for a file that is not UTF-8 (or unreadable)."""
    try:
        return path.read_text(encoding="utf-8"), ""
    except (UnicodeDecodeError, OSError):
        return None, "not_utf8"


def fill_to_cap(candidates, read, cap_bytes: float, skipped: dict[str, int]) -> list[tuple[str, str]]:
    """`[(name, text)]` of the candidate names in a fixed pseudo-random order (a hash of each name) up to
    `cap_bytes` of text; `read(name) -> (text, "") or (None, why)`; empty and generated files are skipped too, and
    every skip is counted in `skipped`."""
    selected, total = [], 0
    for relative in sorted(candidates, key=lambda r: path_fraction("order", r)):
        text, reason = read(relative)
        if not reason and not text.strip():
            reason = "empty"
        elif not reason and GENERATED.search(text[:2048]):
            reason = "generated"
        if reason:
            skipped[reason] += 1
            continue
        size = len(text.encode("utf-8"))
        if total + size > cap_bytes:
            skipped["over_cap"] += 1
            continue
        selected.append((relative, text))
        total += size
    return selected


def expand_source(pattern: str) -> str:
    """A source pattern with `{stdlib}` / `{purelib}` (any key of `sysconfig.get_paths()`) and `~` expanded: the
    running interpreter's own paths, so a config names them the same on every machine and in every venv."""
    paths = sysconfig.get_paths()
    try:
        return os.path.expanduser(pattern.format(**paths))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"Source pattern {pattern!r}: unknown placeholder {error}; use one of "
                         f"{sorted('{' + key + '}' for key in paths)}.") from None


def glob_root(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard: files are named relative to it."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
    return str(Path(*parts[:fixed])) if fixed else "."


def package_description(text: str) -> str:
    """The description of a package's core metadata (`*.dist-info/METADATA`, `PKG-INFO`): its README, without the
    header fields (name, version, classifiers, dependencies, often a whole licence text), which are not prose."""
    import email

    message = email.message_from_string(text)
    body = message.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    # Metadata 1.x keeps the description in a header, its continuation lines indented by 8 spaces or "       |".
    description = message.get("Description", "")
    return re.sub(r"\n(?:        |       \|)", "\n", str(description))


def read_domain_file(path: Path) -> tuple[str | None, str]:
    """`(text, "")` of a domain's file, or `(None, why it was skipped)`: not UTF-8 (or unreadable), binary (a NUL
    byte: UTF-8 by accident), licence boilerplate. Package metadata contributes its description only."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None, "not_utf8"
    if b"\0" in raw:
        return None, "binary"
    if path.name in ("METADATA", "PKG-INFO"):
        text = package_description(text)
    text = without_licence_header(text)
    return (None, "licence") if text is None else (text, "")


def without_licence_header(text: str) -> str | None:
    """`text` without a licence in its leading comment (`#` lines, an HTML comment); None when what is left still
    starts with a licence (the file is one)."""
    if not LICENCE.search(text[:1024]):
        return text
    header = LEADING_COMMENT.match(text)
    if header and LICENCE.search(header.group()):
        text = text[header.end() :]
    return None if LICENCE.search(text[:1024]) else text


def domain_candidates(name: str, spec: dict, skipped: dict[str, int]) -> tuple[dict[str, Path], dict[str, int]]:
    """`{domain/relative path: file}` of every file the domain's sources match, before reading any, and how many
    files each source matched. A source that matches nothing (a package this machine lacks) is not an error."""
    candidates: dict[str, Path] = {}
    seen: set[Path] = set()
    matched = {}
    for source in spec["sources"]:
        pattern = expand_source(source)
        root = Path(glob_root(pattern))
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        matched[source] = 0
        for path in paths:
            if not path.is_file() or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            relative = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(part.lower(), exclude.lower()) for part in Path(relative).parts
                   for exclude in spec["exclude"]):
                skipped["excluded"] += 1
                continue
            if path.stat().st_size > spec["max_file_kb"] * 1024:
                skipped["too_large"] += 1
                continue
            key = f"{name}/{relative}"
            if key in candidates:  # two sources' roots gave one name: keep the first, the split needs unique names
                skipped["duplicate_name"] += 1
                continue
            candidates[key] = path
            matched[source] += 1
    return candidates, matched


def select_domain_files(name: str, spec: dict) -> tuple[list[tuple[str, str]], dict]:
    """Like `select_files`, for one domain: `[(domain/relative path, text)]` in cap order up to the domain's
    `max_mb`, and `{"skipped": counts, "sources": files each source matched}`."""
    skipped = {key: 0 for key in ("excluded", "too_large", "duplicate_name", "empty", "not_utf8", "binary",
                                  "generated", "licence", "over_cap")}
    candidates, matched = domain_candidates(name, spec, skipped)
    selected = fill_to_cap(candidates, lambda relative: read_domain_file(candidates[relative]),
                           spec["max_mb"] * 1024 * 1024, skipped)
    if not selected:
        raise ValueError(
            f"Domain {name!r}: no usable files (files per source: {matched}; skipped: {skipped}). Point its sources "
            "at text files on this machine, or change its exclude / max_file_kb."
        )
    return selected, {"skipped": skipped, "sources": matched}


def split_corpus(args: LabArguments, files: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    splits = {"train": [], "heldout": []}
    for relative, text in files:
        splits["heldout" if path_fraction("heldout", relative) < args.heldout_fraction else "train"].append(
            (relative, text)
        )
    for name, rows in splits.items():
        if not rows:
            raise ValueError(
                f"The {name} split is empty ({len(files)} files, heldout_fraction={args.heldout_fraction}): use more "
                "files or a heldout_fraction that leaves files on both sides."
            )
    return splits


def content_digest(files: list[tuple[str, str]]) -> str:
    content = hashlib.sha256()
    for relative, text in files:
        content.update(relative.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return content.hexdigest()[:16]


def corpus_settings(args: LabArguments, files: list[tuple[str, str]]) -> dict:
    """What determines the corpus: where files come from, the caps, the split and the files' contents. Without
    domains exactly the keys of a single-domain lab, so existing caches keep their keys."""
    if args.domains:
        sources = {name: {**spec, "sources": [expand_source(s) for s in spec["sources"]]}
                   for name, spec in args.domains.items()}
        return {"domains": sources, "heldout_fraction": args.heldout_fraction, "content": content_digest(files)}
    return {
        "text_dir": str(args.resolved_text_dir), "file_glob": args.file_glob, "exclude_dirs": args.exclude_dirs,
        "max_file_kb": args.max_file_kb, "max_corpus_mb": args.max_corpus_mb,
        "heldout_fraction": args.heldout_fraction, "content": content_digest(files),
    }


def megabytes(rows) -> float:
    return round(sum(len(text.encode()) for _, text in rows) / 2**20, 2)


def domain_of(relative: str) -> str:
    return relative.split("/", 1)[0]


def domain_corpus_stage(args: LabArguments) -> dict:
    """Every domain's files, each row labelled with its domain; one split by path hash over all of them (the
    paths start with the domain's name, so no two domains share one)."""
    files, selections = [], {}
    for name, spec in args.domains.items():
        domain_files, selections[name] = select_domain_files(name, spec)
        files += domain_files

    def build(directory: Path) -> dict:
        splits = split_corpus(args, files)
        metrics = {"skipped": {}, "domains": {}}
        for name in args.domains:
            sides = {side: [row for row in rows if domain_of(row[0]) == name] for side, rows in splits.items()}
            empty = [side for side, rows in sides.items() if not rows]
            if empty:
                raise ValueError(f"Domain {name!r} has no {' or '.join(empty)} files "
                                 f"({sum(map(len, sides.values()))} files, heldout_fraction="
                                 f"{args.heldout_fraction}): give it more files or raise heldout_fraction.")
            metrics["domains"][name] = {**selections[name], **{
                side: {"files": len(rows), "megabytes": megabytes(rows)} for side, rows in sides.items()}}
            for reason, count in selections[name]["skipped"].items():
                metrics["skipped"][reason] = metrics["skipped"].get(reason, 0) + count
        for side, rows in splits.items():
            with open(directory / f"{side}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps({"path": relative, "text": text, "domain": domain_of(relative)}) + "\n"
                               for relative, text in rows)
            metrics[side] = {"files": len(rows), "megabytes": megabytes(rows)}
        for name, domain in metrics["domains"].items():
            log(f"corpus {name}: {domain['train']} train, {domain['heldout']} held out; files per source "
                f"{domain['sources']}")
        return metrics

    return run_stage(Path(args.output_dir) / "corpus", corpus_settings(args, files), build, args.force)


def corpus_stage(args: LabArguments) -> dict:
    if args.domains:
        return domain_corpus_stage(args)
    files, skipped = select_files(args)
    settings = corpus_settings(args, files)

    def build(directory: Path) -> dict:
        splits = split_corpus(args, files)
        metrics = {"skipped": skipped}
        for name, rows in splits.items():
            with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as out:
                for relative, text in rows:
                    out.write(json.dumps({"path": relative, "text": text}) + "\n")
            metrics[name] = {"files": len(rows), "megabytes": round(sum(len(t.encode()) for _, t in rows) / 2**20, 2)}
        log(f"corpus: {metrics['train']} train, {metrics['heldout']} held out from {args.resolved_text_dir}")
        return metrics

    return run_stage(Path(args.output_dir) / "corpus", settings, build, args.force)


def read_split(directory: Path, name: str) -> list[dict]:
    with open(directory / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----- stage 2: tokenizer -------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (every byte is a token, so any text round-trips), BOS prepended, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tokenizer_settings(args: LabArguments, corpus: dict) -> dict:
    return {"vocab_size": args.vocab_size, "corpus": corpus["key"]}


def tokenizer_stage(args: LabArguments, corpus: dict) -> dict:
    settings = tokenizer_settings(args, corpus)

    def build(directory: Path) -> dict:
        texts = [row["text"] for row in read_split(Path(args.output_dir) / "corpus", "train")]
        tokenizer = train_tokenizer(texts, args.vocab_size)
        tokenizer.save_pretrained(directory)
        return {"vocab_size": len(tokenizer)}

    return run_stage(Path(args.output_dir) / "tokenizer", settings, build, args.force)


def load_tokenizer(args: LabArguments):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(args.output_dir) / "tokenizer")


# ----- stage 3: blocks and held-out prompts -------------------------------------------------------------------


def pack_blocks(tokenizer, texts: list[str], block_length: int) -> torch.Tensor:
    """Every file as BOS + tokens + EOS, concatenated and cut into `(n, block_length)` blocks (the tail dropped)."""
    stream = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) // block_length * block_length
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block_length)


def opens_a_paragraph(text: str, start: int) -> bool:
    """Whether the line at `start` begins a paragraph of sentences: words with lower-case letters, and no
    `====` / `----` underline after it (that makes it an rst / markdown heading)."""
    line, following = (text[start : start + 4096].split("\n", 2) + ["", ""])[:2]
    underline = following.strip() and set(following.strip()) <= set("=-~^*#+")
    return " " in line.strip() and any(c.islower() for c in line) and not underline


def prompt_starts(text: str, prompt_start: str = "def") -> list[int]:
    """Where a prompt may start: a `def` / `class` line, or with "paragraph" the first line of a paragraph of
    prose; any line's start in a file that has none."""
    if prompt_start == "paragraph":
        starts = [m.end() for m in PARAGRAPH_START.finditer(text) if opens_a_paragraph(text, m.end())]
    else:
        starts = [m.start() for m in PROMPT_START.finditer(text)]
    return starts or [m.start() for m in re.finditer(r"^\S", text, re.MULTILINE)]


def heldout_prompts(args: LabArguments, tokenizer, rows: list[dict], count: int | None = None,
                    category: str | None = None, prompt_start: str = "def") -> list[dict]:
    """The beginnings of held-out chunks: from a `def` / `class` line (any line for other text; paragraphs with
    `prompt_start="paragraph"`) of a held-out file, `prompt_min_tokens`..`prompt_max_tokens` tokens, with enough
    text after it to continue. `count` / `category` default to num_prompts / prompt_category."""
    count = args.num_prompts if count is None else count
    category = args.prompt_category if category is None else category
    rng = random.Random(args.seed)
    candidates = []
    for row in sorted(rows, key=lambda r: path_fraction("prompts", r["path"])):
        text = row["text"]
        starts = prompt_starts(text, prompt_start)
        rng.shuffle(starts)
        candidates.append((row["path"], text, starts))
    prompts = []
    # Round-robin over files: one prompt per file first, more per file only when files run out.
    for round_index in range(max((len(s) for _, _, s in candidates), default=0)):
        for path, text, starts in candidates:
            if len(prompts) == count:
                return prompts
            if round_index >= len(starts):
                continue
            ids = tokenizer(text[starts[round_index] :][: 16 * args.prompt_max_tokens], add_special_tokens=False)[
                "input_ids"
            ]
            length = rng.randint(args.prompt_min_tokens, args.prompt_max_tokens)
            if len(ids) < length + 16:
                continue
            prompts.append({"id": f"heldout-{len(prompts) + 1:03d}", "category": category,
                            "prompt": tokenizer.decode(ids[:length]), "source": path})
    return prompts


def domain_prompts(args: LabArguments, tokenizer, rows: list[dict]) -> list[dict]:
    """num_prompts / len(domains) held-out prompts of each domain, `category` = the domain, interleaved (so any
    first n prompts are balanced too); every domain is cut to the fewest any of them has, so the set stays balanced."""
    per_domain = args.num_prompts // len(args.domains)
    by_domain = {
        name: heldout_prompts(args, tokenizer, [row for row in rows if row["domain"] == name], per_domain, name,
                              spec["prompt_start"])
        for name, spec in args.domains.items()
    }
    fewest = min(len(prompts) for prompts in by_domain.values())
    if fewest == 0:
        empty = [name for name, prompts in by_domain.items() if not prompts]
        raise ValueError(f"No held-out file of domain(s) {empty} is long enough for a prompt; lower "
                         "prompt_min_tokens, raise heldout_fraction or add text.")
    if fewest < per_domain:
        log(f"prompts: only {fewest} of {per_domain} per domain ({ {n: len(p) for n, p in by_domain.items()} }), "
            "so every domain gets that many")
    interleaved = [prompts[i] for i in range(fewest) for prompts in by_domain.values()]
    return [{**prompt, "id": f"heldout-{i + 1:03d}"} for i, prompt in enumerate(interleaved)]


def data_settings(args: LabArguments, tokenizer_record: dict) -> dict:
    settings = {"block_length": args.block_length, "seed": args.seed, "tokenizer": tokenizer_record["key"]}
    return {**settings, "domains": args.domain_names} if args.domains else settings


def shuffled(blocks: torch.Tensor, seed: int) -> torch.Tensor:
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]


def build_domain_data(args: LabArguments, directory: Path) -> dict:
    """Per domain `train-<domain>.pt` / `heldout-<domain>.pt` (packed within the domain, so every block has one
    label); `train.pt` is all of them (the target learns every domain) and `heldout.pt` all held-out blocks
    shuffled together."""
    tokenizer = load_tokenizer(args)
    corpus = Path(args.output_dir) / "corpus"
    rows = {side: read_split(corpus, side) for side in ("train", "heldout")}
    trains, heldouts, metrics = [], [], {"domains": {}}
    for name in args.domains:
        texts = {side: [r["text"] for r in split if r["domain"] == name] for side, split in rows.items()}
        train = pack_blocks(tokenizer, texts["train"], args.block_length)
        heldout = shuffled(pack_blocks(tokenizer, texts["heldout"], args.block_length), args.seed)
        if len(train) < args.draft_batch_size or len(heldout) == 0:
            raise ValueError(
                f"Too little text in domain {name!r}: {len(train)} train and {len(heldout)} held-out blocks of "
                f"{args.block_length} tokens (need at least draft_batch_size, {args.draft_batch_size}, and 1). Raise "
                "its max_mb or heldout_fraction, or shorten block_length."
            )
        torch.save(train, directory / f"train-{name}.pt")
        torch.save(heldout, directory / f"heldout-{name}.pt")
        trains.append(train)
        heldouts.append(heldout)
        metrics["domains"][name] = {
            "train_blocks": len(train), "train_tokens": train.numel(), "heldout_blocks": len(heldout),
            "characters_per_token": round(sum(map(len, texts["train"])) / max(train.numel(), 1), 3)}
    train, heldout = torch.cat(trains), shuffled(torch.cat(heldouts), args.seed)
    if len(train) < args.batch_size:
        raise ValueError(f"Too little text: {len(train)} train blocks, fewer than batch_size ({args.batch_size}).")
    torch.save(train, directory / "train.pt")
    torch.save(heldout, directory / "heldout.pt")
    return {"train_blocks": len(train), "train_tokens": train.numel(), "heldout_blocks": len(heldout),
            "characters_per_token": round(sum(len(r["text"]) for r in rows["train"]) / max(train.numel(), 1), 3),
            **metrics}


def data_stage(args: LabArguments, tokenizer_record: dict) -> dict:
    settings = data_settings(args, tokenizer_record)
    if args.domains:
        return run_stage(Path(args.output_dir) / "data", settings, lambda d: build_domain_data(args, d), args.force)

    def build(directory: Path) -> dict:
        tokenizer = load_tokenizer(args)
        corpus = Path(args.output_dir) / "corpus"
        train_rows, heldout_rows = read_split(corpus, "train"), read_split(corpus, "heldout")
        train = pack_blocks(tokenizer, [r["text"] for r in train_rows], args.block_length)
        heldout = pack_blocks(tokenizer, [r["text"] for r in heldout_rows], args.block_length)
        if len(train) < max(args.batch_size, args.draft_batch_size) or len(heldout) == 0:
            raise ValueError(
                f"Too little text: {len(train)} train and {len(heldout)} held-out blocks of {args.block_length} "
                f"tokens (need at least the batch sizes, {args.batch_size} and {args.draft_batch_size}, and 1). "
                "Add text or shorten block_length."
            )
        # Shuffled once, so that the first `eval_blocks` are a sample of every held-out file.
        heldout = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(args.seed))]
        torch.save(train, directory / "train.pt")
        torch.save(heldout, directory / "heldout.pt")
        return {"train_blocks": len(train), "train_tokens": train.numel(), "heldout_blocks": len(heldout),
                "characters_per_token": round(sum(len(r["text"]) for r in train_rows) / max(train.numel(), 1), 3)}

    return run_stage(Path(args.output_dir) / "data", settings, build, args.force)


def prompts_settings(args: LabArguments, corpus_record: dict, tokenizer_record: dict) -> dict:
    settings = {
        "num_prompts": args.num_prompts, "prompt_tokens": [args.prompt_min_tokens, args.prompt_max_tokens],
        "category": args.prompt_category, "seed": args.seed, "corpus": corpus_record["key"],
        "tokenizer": tokenizer_record["key"],
    }
    if args.domains:  # the category is each prompt's domain; where prompts start is each domain's own
        del settings["category"]
        settings["domains"] = {name: spec["prompt_start"] for name, spec in args.domains.items()}
    return settings


def prompts_stage(args: LabArguments, corpus_record: dict, tokenizer_record: dict) -> dict:
    """The held-out prompts, in the benchmark suite's JSONL format, copied to `<output_dir>/heldout.jsonl`."""
    settings = prompts_settings(args, corpus_record, tokenizer_record)

    def build(directory: Path) -> dict:
        rows = read_split(Path(args.output_dir) / "corpus", "heldout")
        select = domain_prompts if args.domains else heldout_prompts
        prompts = select(args, load_tokenizer(args), rows)
        if not prompts:
            raise ValueError("No held-out file is long enough for a prompt; lower prompt_min_tokens or add text.")
        with open(directory / "heldout.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in prompts)
        if args.domains:
            return {"prompts": len(prompts), "per_domain": {n: sum(p["category"] == n for p in prompts)
                                                            for n in args.domains}}
        return {"prompts": len(prompts)}

    record = run_stage(Path(args.output_dir) / "prompts", settings, build, args.force)
    shutil.copyfile(Path(args.output_dir) / "prompts" / "heldout.jsonl", Path(args.output_dir) / "heldout.jsonl")
    return record


def block_dataset(tensor: torch.Tensor, prompt_tokens: int = 0):
    """Blocks as an `input_ids` (+ `labels`) dataset; `prompt_tokens` > 0 marks each block's start as the prompt
    (not trained), which on-policy distillation continues from."""
    from datasets import Dataset

    input_ids = tensor.tolist()
    labels = [[-100] * prompt_tokens + ids[prompt_tokens:] for ids in input_ids]
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


# ----- stage 4: target ----------------------------------------------------------------------------------------


def llama(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def max_positions(args: LabArguments) -> int:
    return max(1024, args.block_length)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trainer_arguments(args: LabArguments, directory: Path, steps: int, learning_rate: float, batch_size: int) -> dict:
    """The TrainingArguments every lab stage shares (the drafter configs add their own fields)."""
    return dict(
        output_dir=str(directory), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=32, learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.0, logging_steps=args.logging_steps, save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_pin_memory=False, use_cpu=not args.use_cuda, bf16=args.bf16, seed=args.seed,
    )


class TimeLimit(TrainerCallback):
    """Stops training after `minutes` (checked after every step)."""

    def __init__(self, minutes: float):
        self.minutes, self.start = minutes, time.perf_counter()

    def on_train_begin(self, *_, **__):
        self.start = time.perf_counter()

    def on_step_end(self, _args, state, control, **__):
        if time.perf_counter() - self.start > self.minutes * 60:
            log(f"time limit of {self.minutes} min reached at step {state.global_step}")
            control.should_training_stop = True


def causal_lm_trainer(args: LabArguments, model, tokenizer, directory: Path, steps: int, learning_rate: float,
                      batch_size: int, train: torch.Tensor, callbacks=None) -> Trainer:
    """A plain `Trainer` with the model's own next-token cross-entropy on `train` blocks (target and `sft`)."""
    training_args = TrainingArguments(**trainer_arguments(args, directory, steps, learning_rate, batch_size))
    return Trainer(model=model, args=training_args, train_dataset=block_dataset(train),
                   data_collator=DraftDataCollator(tokenizer.pad_token_id), callbacks=callbacks)


def last_logged(history: list[dict], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def target_settings(args: LabArguments, data_record: dict) -> dict:
    return {
        "hidden_size": args.target_hidden_size, "layers": args.target_layers, "heads": args.target_heads,
        "intermediate_size": args.target_intermediate_size, "steps": args.target_steps,
        "max_minutes": args.target_max_minutes, "learning_rate": args.target_learning_rate,
        "batch_size": args.batch_size, "bf16": args.bf16, "seed": args.seed, "data": data_record["key"],
    }


def target_stage(args: LabArguments, data_record: dict) -> dict:
    settings = target_settings(args, data_record)

    def build(directory: Path) -> dict:
        tokenizer = load_tokenizer(args)
        model = llama(tokenizer, args.target_hidden_size, args.target_layers, args.target_heads,
                      args.target_intermediate_size, max_positions(args), args.seed)
        callbacks = [TimeLimit(args.target_max_minutes)] if args.target_max_minutes else None
        train = torch.load(Path(args.output_dir) / "data" / "train.pt")
        trainer = causal_lm_trainer(args, model, tokenizer, directory, args.target_steps, args.target_learning_rate,
                                    args.batch_size, train, callbacks)
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(directory))
        tokenizer.save_pretrained(directory)
        steps = trainer.state.global_step
        train_loss = last_logged(trainer.state.log_history, "loss")
        return {
            "parameters": count_parameters(model), "steps": steps, "train_seconds": round(seconds, 1),
            "train_tokens": steps * args.batch_size * args.block_length,
            "tokens_per_second": round(steps * args.batch_size * args.block_length / seconds, 1),
            "mean_train_loss": round(output.training_loss, 4),
            "final_train_loss": round(train_loss, 4) if train_loss is not None else None,
        }

    return run_stage(Path(args.output_dir) / "target", settings, build, args.force)


# ----- stage 5: drafters --------------------------------------------------------------------------------------


def drafter_dir(args: LabArguments, name: str) -> Path:
    return Path(args.output_dir) / "drafters" / name


def init_settings(args: LabArguments, tokenizer_record: dict) -> dict:
    return {
        "hidden_size": args.draft_hidden_size, "layers": args.draft_layers, "heads": args.draft_heads,
        "intermediate_size": args.draft_intermediate_size, "seed": args.seed + 1,
        "max_positions": max_positions(args), "tokenizer": tokenizer_record["key"],
    }


def init_stage(args: LabArguments, tokenizer_record: dict) -> dict:
    settings = init_settings(args, tokenizer_record)

    def build(directory: Path) -> dict:
        tokenizer = load_tokenizer(args)
        draft = llama(tokenizer, args.draft_hidden_size, args.draft_layers, args.draft_heads,
                      args.draft_intermediate_size, max_positions(args), args.seed + 1)
        draft.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return {"parameters": count_parameters(draft)}

    return run_stage(drafter_dir(args, "init"), settings, build, args.force)


def drafter_settings(args: LabArguments, name: str, records: dict) -> dict:
    """Exactly what determines drafter `name`: its own fields, the shared drafter fields and its inputs' keys."""
    shared = {"learning_rate": args.draft_learning_rate, "batch_size": args.draft_batch_size,
              "train_blocks": args.draft_train_blocks, "bf16": args.bf16, "seed": args.seed,
              "data": records["data"]["key"]}
    distill = {"lmbda": args.distill_lmbda, "init": records["init"]["key"], "target": records["target"]["key"]}
    if name in args.domain_drafters():  # distill-fkl's recipe on the named domains' blocks
        own = {"steps": args.distill_fkl_steps, **distill, "domains": args.domain_drafters()[name]}
        return {"drafter": name, **shared, **own}
    own = {
        "sft": {"steps": args.sft_steps, "init": records["init"]["key"]},
        "distill-fkl": {"steps": args.distill_fkl_steps, **distill},
        "distill-tvd": {"steps": args.distill_tvd_steps, **distill},
        "distill-fkl-long": {"steps": args.resolved_adaspec_steps, **distill},
        "adaspec": {"steps": args.resolved_adaspec_steps, "k": args.adaspec_k, **distill,
                    "reference": records.get("distill-fkl", {}).get("key")},
        "soft": {"steps": args.soft_steps, "layers": args.soft_layers, "exits": args.soft_exits,
                 "thresholds": args.soft_exit_thresholds, "target": records["target"]["key"]},
        "guided": {"steps": args.guided_steps, "init": records["init"]["key"], "target": records["target"]["key"],
                   "states": args.resolved_target_state_layers, "draft_length": args.num_draft_tokens},
        "eagle3": {"steps": args.eagle3_steps, "target": records["target"]["key"],
                   "states": args.resolved_target_state_layers, "ttt_steps": args.eagle3_ttt_steps,
                   "draft_vocab_size": args.eagle3_draft_vocab_size},
    }[name]
    return {"drafter": name, **shared, **own}


def drafter_blocks(args: LabArguments, train: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The drafters' training set: `draft_train_blocks` (or `count`) of the target's train blocks, drawn with the
    seed."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 2))
    return train[order[: args.draft_train_blocks if count is None else count]]


def domain_drafter_blocks(args: LabArguments, domains: list[str]) -> torch.Tensor:
    """A domain drafter's training set: draft_train_blocks drawn from its domains' train blocks, an equal share
    from each (so `distill-all` sees the mix the held-out prompts have, not the corpus's proportions)."""
    data = Path(args.output_dir) / "data"
    share = args.draft_train_blocks // len(domains)
    parts = []
    for name in domains:
        train = torch.load(data / f"train-{name}.pt")
        if len(train) < share:
            log(f"domain {name!r} has {len(train)} train blocks, fewer than its share {share}: taking them all")
        parts.append(drafter_blocks(args, train, share))
    return torch.cat(parts)


def train_drafter(args: LabArguments, name: str, directory: Path) -> dict:
    """Train drafter `name` with its trainer, exactly as a user would, and save it with the tokenizer."""
    from transformers import AutoModelForCausalLM

    from trainers import (
        AdaSPECConfig,
        AdaSPECTrainer,
        DistillConfig,
        DistillTrainer,
        Eagle3Trainer,
        Eagle3TrainingConfig,
        GuidedDrafterConfig,
        GuidedDrafterTrainer,
        SoFTConfig,
        SoFTTrainer,
        truncate_model,
    )

    tokenizer = load_tokenizer(args)
    data = Path(args.output_dir) / "data"
    target_path = str(Path(args.output_dir) / "target")
    init = AutoModelForCausalLM.from_pretrained(drafter_dir(args, "init"))
    domains = args.domain_drafters().get(name)
    steps = {"sft": args.sft_steps, "distill-fkl": args.distill_fkl_steps, "distill-tvd": args.distill_tvd_steps,
             "adaspec": args.resolved_adaspec_steps, "distill-fkl-long": args.resolved_adaspec_steps,
             "soft": args.soft_steps, "guided": args.guided_steps, "eagle3": args.eagle3_steps,
             }.get(name, args.distill_fkl_steps)  # domain drafters: distill-fkl's steps
    common = trainer_arguments(args, directory, steps, args.draft_learning_rate, args.draft_batch_size)
    common["max_length"] = args.block_length
    if domains:
        train = domain_drafter_blocks(args, domains)
    else:
        train = drafter_blocks(args, torch.load(data / "train.pt"))
    if name == "sft":
        trainer = causal_lm_trainer(args, init, tokenizer, directory, steps, args.draft_learning_rate,
                                    args.draft_batch_size, train)
    elif name == "soft":  # SD2: the target's first layers, every exit trained with cross-entropy on the text
        model = truncate_model(AutoModelForCausalLM.from_pretrained(target_path), args.soft_layers)
        config = SoFTConfig(exits=args.soft_exits, exit_thresholds=args.soft_exit_thresholds, **common)
        trainer = SoFTTrainer(model=model, args=config, train_dataset=block_dataset(train), processing_class=tokenizer)
    elif name == "guided":  # SD²: `init` and its guide trained together, steered by stale target states
        config = GuidedDrafterConfig(verifier_layers=args.resolved_target_state_layers,
                                     draft_length=args.num_draft_tokens, divergence="forward_kl", **common)
        trainer = GuidedDrafterTrainer(model=init, teacher_model=AutoModelForCausalLM.from_pretrained(target_path),
                                       args=config, train_dataset=block_dataset(train), processing_class=tokenizer)
    elif name == "eagle3":  # a fresh head over the target's states, its vocabulary counted on the same blocks
        config = Eagle3TrainingConfig(aux_hidden_state_layer_ids=args.resolved_target_state_layers,
                                      ttt_steps=args.eagle3_ttt_steps, draft_vocab_size=args.eagle3_draft_vocab_size,
                                      **common)
        trainer = Eagle3Trainer(model=None, teacher_model=AutoModelForCausalLM.from_pretrained(target_path),
                                args=config, train_dataset=block_dataset(train), processing_class=tokenizer)
    else:
        target = AutoModelForCausalLM.from_pretrained(target_path)
        prompt_tokens = args.block_length // 2 if args.distill_lmbda > 0 else 0
        distill = dict(lmbda=args.distill_lmbda, max_new_tokens=max(args.block_length - prompt_tokens, 1), **common)
        dataset = block_dataset(train, prompt_tokens)
        if name == "adaspec":
            reference = AutoModelForCausalLM.from_pretrained(drafter_dir(args, "distill-fkl"))
            trainer = AdaSPECTrainer(
                model=init, teacher_model=target, ref_model=reference, train_dataset=dataset,
                args=AdaSPECConfig(k=args.adaspec_k, divergence="forward_kl", **distill), processing_class=tokenizer,
            )
        else:
            divergence = "tvd" if name == "distill-tvd" else "forward_kl"
            trainer = DistillTrainer(model=init, teacher_model=target, train_dataset=dataset,
                                     args=DistillConfig(divergence=divergence, **distill), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(directory))
    tokenizer.save_pretrained(directory)
    history = trainer.state.log_history
    logged = {key: last_logged(history, key) for key in ("loss", "expected_acceptance", "top1_agreement")}
    return {"parameters": count_parameters(trainer.model), "steps": trainer.state.global_step,
            "train_seconds": round(seconds, 1), "last_logged": logged}


def drafter_stages(args: LabArguments, records: dict) -> dict[str, dict]:
    drafters = {}
    for name in args.wanted_drafters():
        if name == "init":
            drafters[name] = records["init"]
            continue
        inputs = {**records, **drafters}
        drafters[name] = run_stage(
            drafter_dir(args, name), drafter_settings(args, name, inputs),
            lambda directory, name=name: train_drafter(args, name, directory), args.force,
        )
    return drafters


# ----- measuring ----------------------------------------------------------------------------------------------


def heldout_sets(args: LabArguments) -> dict[str | None, torch.Tensor]:
    """The held-out blocks measured: `{None: the first eval_blocks}`, or with domains `{domain: its first
    eval_blocks}` (so each domain counts equally in the overall numbers, as in the prompts)."""
    data = Path(args.output_dir) / "data"
    if not args.domains:
        return {None: torch.load(data / "heldout.pt")[: args.eval_blocks]}
    return {name: torch.load(data / f"heldout-{name}.pt")[: args.eval_blocks] for name in args.domains}


def acceptance_results(totals: dict[tuple, torch.Tensor]) -> dict[str, dict]:
    """`{drafter: {"expected_acceptance", "top1_agreement"}}` (+ `exits` of sorted drafters) from token sums and
    counts."""
    results: dict[str, dict] = {}
    for (name, exit_layer), (accept, top1, count) in totals.items():
        metrics = {"expected_acceptance": float(accept) / float(count), "top1_agreement": float(top1) / float(count)}
        if exit_layer is None:
            results[name] = metrics
        else:  # the drafter's numbers are its last exit's; every exit is kept
            results.setdefault(name, {"exits": {}})["exits"][str(exit_layer)] = metrics
            results[name].update(metrics)
    return results


def target_results(totals: torch.Tensor, count: int, blocks: int) -> dict:
    loss = float(totals[1]) / count
    return {"next_token_accuracy": float(totals[0]) / count, "loss": loss, "perplexity": math.exp(loss),
            "blocks": blocks}


def drafter_scorers(path: str, target) -> dict[int | None, Callable]:
    """`{exit (None: the drafter's one output): fn(ids, target hidden_states) -> logits}` of a drafter checkpoint, the
    logits predicting the last tokens of the block. Teacher-forced as its first draft token of a round sees the
    text: a causal LM (or a sorted exit) reads the prefix; `guided` is steered by the target's state one position
    back and `eagle3` reads the target's states up to the token before, so both start at a block's second token."""
    from hf_specdec.drafters import drafter_kind, load_drafter_model
    from trainers import exit_logits

    kind = drafter_kind(path)
    draft = load_drafter_model(path).to(target.device)
    if kind == "eagle3":
        draft.attach_target(target)  # a saved head has no embedding of its own: it is the target's

        def head_logits(ids, hidden):
            features = torch.stack([hidden[k] for k in draft.config.aux_hidden_state_layer_ids], dim=-2)
            logits = draft(input_ids=ids[:, 1:], features=features[:, :-1]).logits[:, :-1]
            return draft.logits_in_target_vocabulary(logits)

        return {None: head_logits}
    if kind == "guided":
        def guided_logits(ids, hidden):
            previous = (torch.arange(ids.shape[1], device=ids.device) - 1).clamp(min=0)
            guides = draft.guide_states_from_hidden_states(hidden)[:, previous]
            return draft(input_ids=ids, guide_states=guides).logits[:, 1:-1]

        return {None: guided_logits}
    exits = getattr(draft.config, "sorted_exits", None) if kind == "sorted" else None
    if not exits:
        return {None: lambda ids, hidden: draft(input_ids=ids).logits[:, :-1]}
    return {e: lambda ids, hidden, e=e: exit_logits(draft, ids, None, [e])[e][:, :-1] for e in exits}


@torch.no_grad()
def acceptance_against_target(args: LabArguments, drafters: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """Held-out Σ min(p, q) and top-1 agreement of every drafter (every exit of `soft`) against the target, token
    means over the held-out blocks (the target runs once per batch for all drafters); and the target's own
    next-token accuracy and loss on the same tokens. With domains, each result also has `domains`: the same
    numbers on each domain's held-out blocks."""
    from transformers import AutoModelForCausalLM

    from trainers.losses import expected_acceptance, shared_vocab, top1_agreement

    device = "cuda" if args.use_cuda else "cpu"
    target = AutoModelForCausalLM.from_pretrained(Path(args.output_dir) / "target").to(device).eval()
    scorers = {(name, exit_layer): score for name in drafters  # (drafter, exit or None) -> logits function
               for exit_layer, score in drafter_scorers(str(drafter_dir(args, name)), target).items()}
    sets = heldout_sets(args)
    totals = {(s, key): torch.zeros(3, dtype=torch.float64) for s in sets for key in scorers}  # Σ accept, top-1, n
    target_totals = {s: torch.zeros(2, dtype=torch.float64) for s in sets}  # the target's accuracy and loss
    for set_name, blocks in sets.items():
        for batch in blocks.split(16):
            ids = batch.to(device)
            outputs = target(input_ids=ids, output_hidden_states=True)
            p = outputs.logits[:, :-1].float()  # position t: the distribution of token t + 1
            following = ids[:, 1:].flatten()
            target_totals[set_name] += torch.stack([
                (p.flatten(0, 1).argmax(-1) == following).sum(),
                torch.nn.functional.cross_entropy(p.flatten(0, 1), following, reduction="sum")]).cpu()
            for key, logits in scorers.items():
                q = logits(ids, outputs.hidden_states)  # the predictions of the block's last q.shape[1] tokens
                q, shared_p = shared_vocab(q.flatten(0, 1).float(), p[:, p.shape[1] - q.shape[1] :].flatten(0, 1))
                totals[set_name, key] += torch.stack([expected_acceptance(q, shared_p).sum(),
                                                      top1_agreement(q, shared_p).sum(),
                                                      torch.tensor(len(q), device=q.device)]).cpu()
    counts = {s: blocks[:, 1:].numel() for s, blocks in sets.items()}
    results = acceptance_results({key: sum(totals[s, key] for s in sets) for key in scorers})
    target_metrics = target_results(sum(target_totals.values()), sum(counts.values()),
                                    sum(len(b) for b in sets.values()))
    if args.domains:
        target_metrics["domains"] = {}
        for set_name in sets:
            per = acceptance_results({key: totals[set_name, key] for key in scorers})
            for name, metrics in per.items():
                results[name].setdefault("domains", {})[set_name] = {
                    k: metrics[k] for k in ("expected_acceptance", "top1_agreement")}
            target_metrics["domains"][set_name] = target_results(target_totals[set_name], counts[set_name],
                                                                 len(sets[set_name]))
    log(f"held-out target: next-token accuracy {target_metrics['next_token_accuracy']:.4f}, loss "
        f"{target_metrics['loss']:.4f}")
    for name, metrics in results.items():
        per_domain = "".join(f"; {d} {m['expected_acceptance']:.4f}" for d, m in metrics.get("domains", {}).items())
        log(f"held-out {name}: expected acceptance {metrics['expected_acceptance']:.4f}, top-1 agreement "
            f"{metrics['top1_agreement']:.4f}{per_domain}")
    return results, target_metrics


def suite_config(args: LabArguments, drafters: dict[str, dict]):
    from hf_specdec.bench import SuiteConfig

    return SuiteConfig(
        target=str(Path(args.output_dir) / "target"),
        drafters={name: str(drafter_dir(args, name)) for name in drafters},
        prompts=(str(Path(args.output_dir) / "heldout.jsonl"),), prompts_per_category=args.bench_prompts,
        experiments=("plain", "chain", "tree"), decodings=("greedy", "sample"), max_new_tokens=args.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens, tree=tuple(args.tree), repeats=args.bench_repeats,
        threads=args.bench_threads, seed=args.seed, device="cuda" if args.use_cuda else "cpu",
    )


def run_benchmark(args: LabArguments, drafters: dict[str, dict]) -> dict:
    """Every drafter × chain / tree × greedy / sampling, and plain decoding, through the project's benchmark suite."""
    try:
        from hf_specdec.bench import run_suite
    except ImportError as error:
        raise ImportError(
            "The benchmark needs hf_specdec.bench.run_suite, which this install does not have; run with "
            "--benchmark false to train and measure held-out acceptance only."
        ) from error
    return run_suite(suite_config(args, drafters), show_progress=True)


def benchmark_cells(report: dict) -> dict[str, dict[str, dict]]:
    """`{drafter: {"chain/greedy": overall metrics (+ the suite's greedy_mismatches), ...}}` from the suite's rows
    (batch size 1)."""
    cells: dict[str, dict[str, dict]] = {}
    for row in report["pairs"][0]["rows"]:
        if row.get("drafter") is None or row.get("batch_size", 1) != 1:
            continue
        cell = dict(row["overall"], greedy_mismatches=row.get("greedy_mismatches", []))
        cells.setdefault(row["drafter"], {})[f"{row['experiment']}/{row['decoding']}"] = cell
    return cells


def lossless_verdict(cell: dict) -> str:
    """`yes` when every greedy output equals plain greedy; `tie` when each difference starts where plain decoding's
    two best logits are equal up to float rounding (the suite's diagnosis); `NO` otherwise."""
    greedy = [cell[mode] for mode in ("chain/greedy", "tree/greedy") if mode in cell]
    if greedy and all(metrics.get("equal_to_plain") is True for metrics in greedy):
        return "yes"
    mismatches = [m for metrics in greedy for m in metrics.get("greedy_mismatches", [])]
    return "tie" if mismatches and all(m["tie"] for m in mismatches) else "NO"


def mismatch_notes(cells: dict, prompt_ids: list[str]) -> list[str]:
    notes = []
    for name, cell in cells.items():
        for mode in ("chain/greedy", "tree/greedy"):
            for m in cell.get(mode, {}).get("greedy_mismatches", []):
                kind = "a float near-tie" if m["tie"] else "NOT a tie: a real mismatch"
                prompt = prompt_ids[m["batch"]] if m["batch"] < len(prompt_ids) else f"batch {m['batch']}"
                notes.append(f"- {name} {mode}, prompt {prompt}: first differs at new token {m['position']} (plain "
                             f"{m['plain_token']}, speculative {m['token']}); plain's logits for the two differ by "
                             f"{abs(m['logit_margin']):.2g}: {kind}.")
    return notes


# ----- the report ---------------------------------------------------------------------------------------------

MODES = ("chain/greedy", "chain/sample", "tree/greedy", "tree/sample")


def fmt(value, digits: int = 3, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def method_label(args: LabArguments, name: str) -> str:
    if name == "distill-all":
        return f"DistillTrainer, forward KL, on an equal mix of {', '.join(args.domain_names)}"
    if name in args.domain_drafters():
        return f"DistillTrainer, forward KL, on `{args.domain_drafters()[name][0]}` only"
    vocabulary = f"{args.eagle3_draft_vocab_size}-token" if args.eagle3_draft_vocab_size else "full"
    return METHODS[name].format(k=args.adaspec_k, layers=args.soft_layers, exits="/".join(map(str, args.soft_exits)),
                                states="/".join(map(str, args.resolved_target_state_layers)), ttt=args.eagle3_ttt_steps,
                                vocab=vocabulary)


# Orderings the papers report: AdaSPEC > DistillSpec > SFT in acceptance; TVD vs FKL depends on task and decoding.
PAPER_ORDERINGS = (("adaspec", "distill-fkl"), ("distill-fkl", "sft"), ("adaspec", "distill-fkl-long"))
HELDOUT_TIE = 0.005  # E[accept] over tens of thousands of held-out tokens: smaller gaps are not worth a verdict
TAU_TIE = 0.1


def comparison_metrics(acceptance: dict, cells: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """`{metric: {drafter: (value, tie margin)}}`. An α's margin is two binomial standard errors of the difference
    (accepted / drafted counts; it ignores the correlation inside a round, so it is a lower bound)."""
    metrics = {"held-out E[accept]": {n: (a["expected_acceptance"], HELDOUT_TIE / 2) for n, a in acceptance.items()}}
    for mode in ("chain/greedy", "chain/sample"):
        metrics[f"α {mode}"] = {}
        for name, cell in cells.items():
            if cell.get(mode, {}).get("acceptance_rate") is not None:
                alpha, drafted = cell[mode]["acceptance_rate"], max(cell[mode]["drafted"], 1)
                metrics[f"α {mode}"][name] = (alpha, math.sqrt(alpha * (1 - alpha) / drafted))
    for mode in ("tree/greedy", "tree/sample"):
        metrics[f"τ {mode}"] = {n: (c[mode]["mean_accepted_length"], TAU_TIE / 2) for n, c in cells.items()
                                if c.get(mode, {}).get("mean_accepted_length") is not None}
    return metrics


def ordering_notes(acceptance: dict, cells: dict) -> list[str]:
    """Where the papers' orderings hold in these numbers, metric by metric, with ties called as ties."""
    metrics = comparison_metrics(acceptance, cells)
    notes = []
    for better, worse in (*PAPER_ORDERINGS, ("distill-tvd", "distill-fkl")):
        holds, fails, ties = [], [], []
        for metric, values in metrics.items():
            if better not in values or worse not in values:
                continue
            (a, error_a), (b, error_b) = values[better], values[worse]
            margin = 2 * math.hypot(error_a, error_b) if metric.startswith("α") else error_a + error_b
            (ties if abs(a - b) <= margin else holds if a > b else fails).append(f"{metric} {a:.3f} vs {b:.3f}")
        if not (holds or fails or ties):
            continue
        if (better, worse) == ("distill-tvd", "distill-fkl"):
            claim = "TVD vs forward KL (DistillSpec: which is better depends on task and decoding)"
        else:
            claim = f"{better} > {worse} (the papers' ordering)"
        if (better, worse) == ("distill-tvd", "distill-fkl"):
            names = {(True, False): "TVD better everywhere", (False, True): "forward KL better everywhere",
                     (True, True): "depends on the metric"}
        else:
            names = {(True, False): "holds", (False, True): "does not hold", (True, True): "mixed"}
        verdict = names.get((bool(holds), bool(fails)), "tie")
        parts = [f"higher in {', '.join(holds)}" if holds else "", f"lower in {', '.join(fails)}" if fails else "",
                 f"tied in {', '.join(ties)}" if ties else ""]
        notes.append(f"- {claim}: **{verdict}** — {better} is " + "; ".join(p for p in parts if p) + ".")
    return notes


def domain_notes(acceptance: dict, domains: list[str]) -> list[str]:
    """Per domain: does its specialist `distill-<domain>` beat every other drafter measured there (the other
    specialists, the generalist `distill-all`, and any other), with ties called as ties."""
    notes = []
    for domain in domains:
        specialist = f"distill-{domain}"
        if specialist not in acceptance:
            continue
        mine = acceptance[specialist]["domains"][domain]["expected_acceptance"]
        others = {name: result["domains"][domain]["expected_acceptance"] for name, result in acceptance.items()
                  if name != specialist and name != "init"}
        if not others:
            continue
        beaten = [f"{name} {value:.3f}" for name, value in others.items() if mine - value > HELDOUT_TIE]
        tied = [f"{name} {value:.3f}" for name, value in others.items() if abs(mine - value) <= HELDOUT_TIE]
        behind = [f"{name} {value:.3f}" for name, value in others.items() if value - mine > HELDOUT_TIE]
        verdict = "best" if not (tied or behind) else "not the best" if behind else "tied for best"
        parts = [f"ahead of {', '.join(beaten)}" if beaten else "", f"tied with {', '.join(tied)}" if tied else "",
                 f"behind {', '.join(behind)}" if behind else ""]
        notes.append(f"- on `{domain}`: {specialist} is **{verdict}** at E[accept] {mine:.3f} — "
                     + "; ".join(p for p in parts if p) + ".")
    return notes


def domain_section(args: LabArguments, acceptance: dict, target_heldout: dict) -> tuple[list[str], list[str]]:
    """The drafter × domain table of held-out acceptance (markdown lines) and the specialists' verdicts."""
    domains = args.domain_names
    target = target_heldout["domains"]
    rows = [[name, *(fmt(result["domains"][d][key]) for d in domains for key in ("expected_acceptance",
                                                                                    "top1_agreement")),
             fmt(result["expected_acceptance"])] for name, result in acceptance.items()]
    header = ["drafter", *(f"{d} {label}" for d in domains for label in ("E[accept]", "top-1")), "mixed E[accept]"]
    blocks = ", ".join(f"{target[d]['blocks']} of {d}" for d in domains)
    target_line = "; ".join(f"{d}: loss {target[d]['loss']:.3f}, next token right "
                            f"{100 * target[d]['next_token_accuracy']:.1f}%" for d in domains)
    legend = (f"The same measurement on each domain's held-out blocks ({blocks}); mixed = all of them (each domain "
              f"equally). `distill-<domain>` trains on that domain only, `distill-all` on an equal mix, all with "
              f"distill-fkl's recipe and steps from the same `init`. The target per domain: {target_line}.")
    lines = ["", "## Held-out acceptance per domain", "", legend, ""]
    lines += table(header, rows, "l" + "r" * (len(header) - 1))
    notes = domain_notes(acceptance, domains)
    if notes:
        question = f"Does each domain's specialist win on its own domain (ties within {HELDOUT_TIE} E[accept])?"
        lines += ["", question, "", *notes]
    return lines, notes


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Markdown table lines; `align` has one letter per column: l(eft) or r(ight)."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def build_report(args: LabArguments, records: dict, acceptance: dict, target_heldout: dict, bench: dict | None,
                 timings: dict[str, float]) -> tuple[str, dict]:
    drafters = records["drafters"]
    cells = benchmark_cells(bench) if bench else {}
    mismatches: list[str] = []
    target, data = records["target"]["metrics"], records["data"]["metrics"]
    corpus, vocab = records["corpus"]["metrics"], records["tokenizer"]["metrics"]["vocab_size"]
    pool = min(args.draft_train_blocks, data["train_blocks"])
    if args.domains:
        source = "domains " + "; ".join(
            f"`{name}` ({domain['train']['files']} train files, {domain['train']['megabytes']} MB, "
            f"{data['domains'][name]['characters_per_token']} characters per token, from "
            f"{', '.join(f'`{s}`' for s, n in domain['sources'].items() if n)})"
            for name, domain in corpus["domains"].items())
    else:
        source = f"`{records['corpus']['settings']['text_dir']}`"
    text = (
        f"Text: {corpus['train']['files']} train files ({corpus['train']['megabytes']} MB) and "
        f"{corpus['heldout']['files']} held-out files ({corpus['heldout']['megabytes']} MB) from "
        f"{source}; byte-level BPE with {vocab} tokens "
        f"({data['characters_per_token']} characters per token); {data['train_tokens']:,} train tokens in blocks of "
        f"{args.block_length}."
    )
    target_line = (
        f"Target: Llama, {args.target_layers} layers × {args.target_hidden_size} wide, "
        f"{target['parameters'] / 1e6:.2f}M parameters, {target['steps']} steps × {args.batch_size} blocks "
        f"({target['train_tokens']:,} tokens at {target['tokens_per_second']:,.0f} tokens/s) → last logged train "
        f"loss {target['final_train_loss']}; on {target_heldout['blocks']} held-out blocks: loss "
        f"{target_heldout['loss']:.4f} (perplexity {target_heldout['perplexity']:.2f}), next token right "
        f"{100 * target_heldout['next_token_accuracy']:.1f}% of the time."
    )
    shapes = {"soft": f"`soft` is the target's first {args.soft_layers} layers ({args.target_hidden_size} wide) with "
                      f"exits {args.soft_exits} and thresholds {args.soft_exit_thresholds}",
              "eagle3": f"`eagle3` is one {args.target_hidden_size}-wide layer over the target's hidden states "
                        f"{args.resolved_target_state_layers} and its embedding"}
    others = "".join(f"; {shape}" for name, shape in shapes.items() if name in drafters)
    draft_line = (
        f"Draft: Llama, {args.draft_layers} layers × {args.draft_hidden_size} wide, "
        f"{records['init']['metrics']['parameters'] / 1e6:.2f}M parameters{others}. Drafters train on {pool:,} blocks ({pool * args.block_length:,} tokens) drawn "
        f"from the target's training data, {args.draft_batch_size} blocks per step (one epoch = "
        f"{pool / args.draft_batch_size:g} steps), learning rate {args.draft_learning_rate:g} (cosine)."
    )
    legend = (
        "E[accept] = held-out Σ min(p, q) per token (what speculative sampling at temperature 1 accepts) and top-1 "
        f"= greedy agreement with the target, over {target_heldout['blocks']} held-out blocks (for `soft`: its last "
        "exit; `guided` steered by the target's state one position back and `eagle3`'s first draft step, reading the "
        "target's states: as each drafts the first token of a round, from a block's second token on). α = accepted / "
        "drafted tokens in real speculative decoding of the held-out prompts: chains of "
        f"{args.num_draft_tokens}, trees of depth / top-k / nodes {'/'.join(map(str, args.tree))} (a tree's α "
        "counts every drafted node, so read its τ below)."
    )
    rows = []
    for name, record in drafters.items():
        metrics, cell = record.get("metrics", {}), cells.get(name, {})
        rows.append([
            name, method_label(args, name), str(metrics.get("steps", 0)),
            fmt(metrics.get("train_seconds", 0.0), 0, " s"),
            fmt(acceptance[name]["expected_acceptance"]), fmt(acceptance[name]["top1_agreement"]),
            *(fmt(cell.get(mode, {}).get("acceptance_rate")) for mode in MODES),
        ])
    lines = ["# Lab report", "", text, "", target_line, "", draft_line, "", "## Acceptance (the papers' table)", "",
             legend, ""]
    lines += table(["drafter", "method", "steps", "train time", "E[accept]", "top-1", "α chain greedy",
                    "α chain sampling", "α tree greedy", "α tree sampling"], rows, "llrrrrrrrr")
    if cells:
        pair = bench["pairs"][0]
        speed_rows = []
        for name in drafters:
            cell, cost = cells.get(name, {}), pair.get("drafters", {}).get(name, {})
            speed_rows.append([
                name, *(fmt(cell.get(mode, {}).get("mean_accepted_length"), 2) for mode in MODES),
                *(fmt(cell.get(mode, {}).get("speedup"), 2, "×") for mode in MODES),
                fmt(cost.get("cost_ratio"), 2), lossless_verdict(cell),
            ])
        plain = {row["decoding"]: row["overall"]["tokens_per_second"] for row in bench["pairs"][0]["rows"]
                 if row["experiment"] == "plain" and row.get("batch_size", 1) == 1}
        lines += ["", "## Tokens per target forward (τ) and speed-up over plain decoding", "",
                  f"{args.bench_prompts} held-out prompts × {args.max_new_tokens} new tokens, batch 1, median of "
                  f"{args.bench_repeats} repeats; speed-up = plain `generate`'s time / the drafter's on the same "
                  "prompts and seeds; c = one draft forward's time / one target forward's (the suite's measurement; "
                  "not for sorted drafters, whose depth varies). Plain decoding: "
                  + ", ".join(f"{d} {v:.1f} tokens/s" for d, v in plain.items())
                  + f"; one target forward {1000 * (pair.get('target_step_seconds') or 0):.1f} ms.", ""]
        lines += table(["drafter", "τ chain greedy", "τ chain sampling", "τ tree greedy", "τ tree sampling",
                        "speed-up chain greedy", "speed-up chain sampling", "speed-up tree greedy",
                        "speed-up tree sampling", "draft cost c", "greedy output = plain"], speed_rows,
                       "lrrrrrrrrrl")
        mismatches = mismatch_notes(cells, [prompt["id"] for prompt in bench.get("prompts", [])])
        if mismatches:
            heading = ("Greedy outputs that differ from plain greedy (the suite's diagnosis; `tie` in the last column "
                       "when every difference starts at a float near-tie):")
            lines += ["", heading, "", *mismatches]
    specialist_notes = []
    if args.domains:
        domain_lines, specialist_notes = domain_section(args, acceptance, target_heldout)
        lines += domain_lines
    notes = ordering_notes(acceptance, cells)
    lines += ["", "## Do the papers' orderings reproduce here?", ""]
    lines += notes or ["- (not enough drafters to compare)"]
    caveat = (
        f"Ties: E[accept] within {HELDOUT_TIE}, τ within {TAU_TIE}, α within two binomial standard errors of the "
        f"difference (from the drafted-token counts)."
    )
    if "adaspec" in drafters:
        caveat += (f" AdaSPEC trains {args.resolved_adaspec_steps} steps (distill_fkl_steps / k: the paper's epochs / "
                   f"k) on about a fraction {args.adaspec_k:g} of the tokens; `distill-fkl-long` gives forward KL the "
                   "same steps.")
    lines += ["", caveat, ""]
    time_rows = [[stage, fmt(records[stage]["seconds"], 1, " s"), "reused" if records[stage]["reused"] else "built"]
                 for stage in ("corpus", "tokenizer", "data", "prompts", "target")]
    time_rows += [[f"drafters/{name}", fmt(record["seconds"], 1, " s"), "reused" if record["reused"] else "built"]
                  for name, record in drafters.items()]
    time_rows += [[name, fmt(seconds, 1, " s"), "this run"] for name, seconds in timings.items()]
    lines += ["## Time", ""] + table(["stage", "time", "cached?"], time_rows, "lrl")
    markdown = "\n".join(lines) + "\n"
    payload = {
        "arguments": asdict(args), "machine": machine(), "stages": {k: records[k] for k in records if k != "drafters"},
        "drafters": drafters, "heldout_acceptance": acceptance, "target_heldout": target_heldout, "benchmark": cells, "timings": timings,
        "ordering_notes": notes, "greedy_mismatches": mismatches, "benchmark_report": bench,
    }
    if args.domains:  # drafter × domain, the numbers a router chooses between
        payload["domain_acceptance"] = {name: result["domains"] for name, result in acceptance.items()}
        payload["domain_notes"] = specialist_notes
    return markdown, payload


def machine() -> dict:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ----- main ---------------------------------------------------------------------------------------------------


def run_lab(args: LabArguments) -> dict:
    """Every stage (reused when cached), then the measurements and the report. Returns the report's JSON payload."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per tokenized dataset drowns the trainers' progress bars
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    records = {"corpus": corpus_stage(args)}
    records["tokenizer"] = tokenizer_stage(args, records["corpus"])
    records["data"] = data_stage(args, records["tokenizer"])
    records["prompts"] = prompts_stage(args, records["corpus"], records["tokenizer"])
    records["target"] = target_stage(args, records["data"])
    records["init"] = init_stage(args, records["tokenizer"])
    records["drafters"] = drafter_stages(args, records)
    timings = {"training stages (this run)": time.perf_counter() - start}
    measure_start = time.perf_counter()
    acceptance, target_heldout = acceptance_against_target(args, records["drafters"])
    timings["held-out acceptance"] = time.perf_counter() - measure_start
    bench = None
    if args.benchmark:
        bench_start = time.perf_counter()
        bench = run_benchmark(args, records["drafters"])
        timings["benchmark"] = time.perf_counter() - bench_start
    timings["total (this run)"] = time.perf_counter() - start
    markdown, payload = build_report(args, records, acceptance, target_heldout, bench, timings)
    Path(args.output_dir, "lab_report.md").write_text(markdown)
    Path(args.output_dir, "lab_report.json").write_text(json.dumps(payload, indent=2, default=str))
    print("\n" + markdown)
    log(f"report written to {Path(args.output_dir, 'lab_report.md')} and lab_report.json")
    return payload


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((LabArguments,), argv)
    return run_lab(args)


if __name__ == "__main__":
    main()
