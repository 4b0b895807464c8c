"""Route: measure every drafter on every prompt, train a router that picks one per prompt, and say how well it picks.

1. Prompts: windows of `prompt_tokens` tokens from a lab's corpus **train** split, `prompts_per_domain` per domain
   (the lab's held-out prompts, on which the benchmark suite later evaluates routing, stay unseen), or the rows of a
   JSONL file (`{"id", "prompt", "category"}`; the category is the domain).
2. Collection, with hf_specdec's own engine: for each prompt, greedy `generate` with each drafter (the arms) →
   α, τ (tokens per verification round) and tokens per second; plain `generate`'s tokens per second; and the
   router's features — the target's prefill states pooled over the prompt (`hf_specdec.routing.prompt_features`,
   what the engine pools at generation time) — at several layers. One JSON line per prompt is appended to
   `collect.jsonl`, so an interrupted run resumes where it stopped; then every record becomes a `datasets.Dataset`
   in `measurements/`.
3. Training: each domain's prompts are split into train / held-out by a hash of their id; for each stored layer a
   `DrafterRouter` learns to predict every arm's τ (or tokens/s) from the features, and the layer with the best
   held-out accuracy is kept (or a fixed `feature_layer`). The router is saved to `router/` and `routing.json`
   lists the drafters, in the format `RoutedDrafter.from_pretrained(output_dir)` reads.
4. Report: `route_report.md` / `route_report.json` — per domain, each single arm's, the routed and the oracle's
   τ and tokens/s; the router's accuracy and regret on held-out and train prompts; chosen-arm counts.

    python recipes/route.py --config recipes/configs/route.yaml        # after lab_domains.yaml (~5-10 min, 2 cores)
    python recipes/route.py --config recipes/configs/route_tiny.yaml   # after lab_domains_tiny.yaml (seconds)
    python recipes/route.py --target out/target --drafter code=out/code prose=out/prose --drafters code prose ngram \\
        --prompts_file my_prompts.jsonl --output_dir out/route-mine
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common` and `lab` when imported from elsewhere (tests)

from _common import parse_args

from hf_specdec.bench.prompts import Prompt, encode, load_prompts
from hf_specdec.routing import (
    OBJECTIVES,
    DrafterRouter,
    evaluate_router,
    prompt_features,
    routing_metrics,
    train_router,
)

NGRAM = "ngram"  # the arm name of prompt-lookup drafting (no checkpoint)
DEFAULT_DOMAIN = "all"  # the domain of corpus rows that carry none (a lab built without `domains`)
COLLECT_FILE, SETTINGS_FILE = "collect.jsonl", "collect_settings.json"
METRICS = ("tau", "tokens_per_second")
METRIC_LABELS = {"tau": "τ", "tokens_per_second": "tokens/s"}


@dataclass
class RouteArguments:
    """Every setting of the routing recipe."""

    # ----- models
    lab: str | None = field(
        default=None,
        metadata={"help": "A `recipes/lab.py` output directory: the target, drafters, tokenizer and corpus come "
                  "from it. Alternatively give --target and --drafter."},
    )
    target: str | None = field(default=None, metadata={"help": "Target checkpoint (when there is no --lab)."})
    drafter: list[str] = field(
        default_factory=list,
        metadata={"help": "Extra drafter checkpoints as NAME=PATH (plain, sorted or guided: `load_drafter` tells "
                  "them apart). With --lab they are added to the lab's drafters."},
    )
    drafters: list[str] | None = field(
        default=None,
        metadata={"help": "The arms to route among, by name: lab drafters, --drafter names and `ngram` (prompt "
                  "lookup). Default with --lab: its domain drafters (every `distill-*` except distill-fkl* and "
                  "distill-tvd); otherwise every --drafter."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer path. Default: <lab>/tokenizer, or the target's folder."}
    )
    # ----- prompts
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "JSONL of {\"id\", \"prompt\", \"category\"} rows (the category is the domain) instead of "
                  "windows of the lab's corpus."},
    )
    domains: list[str] | None = field(
        default=None, metadata={"help": "Domains to draw prompts from. Default: every domain present."}
    )
    prompts_per_domain: int = field(
        default=64,
        metadata={"help": "Prompts per domain: corpus windows, or the first rows of each category of prompts_file. "
                  "Raising it later measures only the new prompts."},
    )
    prompt_tokens: int = field(default=64, metadata={"help": "Tokens per corpus window (the prompt's length)."})
    max_prompt_tokens: int = field(
        default=512,
        metadata={"help": "Longer prompts (of a prompts_file) keep their last this-many tokens, as in the benchmark "
                  "suite (its default), so the router sees what the suite will feed the target."},
    )
    # ----- measuring
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per prompt and arm (greedy)."})
    num_draft_tokens: int = field(default=4, metadata={"help": "Draft length γ of every arm."})
    ngram_max: int = field(default=3, metadata={"help": "`ngram` arm: longest suffix matched (max_ngram)."})
    ngram_min: int = field(default=1, metadata={"help": "`ngram` arm: shortest suffix matched (min_ngram)."})
    feature_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Target `hidden_states` indices whose pooled states are stored per prompt (0 = embeddings, "
                  "i = output of decoder layer i). Default: every other layer, counting down from the last."},
    )
    threads: int | None = field(
        default=1,
        metadata={"help": "torch CPU threads (None: torch's default). Batch-1 decoding of small models is bound by "
                  "per-call overhead, and one thread keeps tokens/s steady on a shared machine."},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    # ----- router
    objective: str = field(
        default="tau",
        metadata={"help": "What the router predicts and maximises: tau (tokens per verification round, portable "
                  "across machines) or tokens_per_second (measured here; machine-specific).", "choices": OBJECTIVES},
    )
    feature_layer: int | None = field(
        default=None,
        metadata={"help": "Use this `hidden_states` index. Default: the stored layer with the best held-out accuracy "
                  "(ties: the lower held-out regret)."},
    )
    heldout_fraction: float = field(
        default=0.25,
        metadata={"help": "Share of each domain's prompts held out from training (chosen by a hash of the prompt id). "
                  "In (0, 1)."},
    )
    mlp_hidden_size: int = field(default=64, metadata={"help": "Router: width of its MLP's hidden layer."})
    epochs: int = field(default=300, metadata={"help": "Router: full-batch AdamW steps."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Router: AdamW learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "Router: AdamW weight decay."})
    dropout: float = field(default=0.0, metadata={"help": "Router: dropout on the hidden layer while training."})
    seed: int = field(default=0, metadata={"help": "Seed of the corpus windows and the router's initial weights."})
    # ----- output
    output_dir: str = field(default="out/route", metadata={"help": "Where measurements, router and report go."})
    force: bool = field(
        default=False, metadata={"help": "Measure every prompt again, discarding collect.jsonl."}
    )

    def __post_init__(self):
        if (self.lab is None) == (self.target is None):
            raise ValueError("Give either --lab DIR (a recipes/lab.py output) or --target PATH with --drafter "
                             "NAME=PATH ..., not both and not neither.")
        if self.lab is None and self.prompts_file is None:
            raise ValueError("Without --lab there is no corpus to draw prompts from: pass --prompts_file PROMPTS.jsonl.")
        if bad := [entry for entry in self.drafter if "=" not in entry or not entry.split("=", 1)[0]]:
            raise ValueError(f"--drafter takes NAME=PATH entries, got {bad}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {self.heldout_fraction}.")
        if self.prompts_per_domain < 1 or self.prompt_tokens < 4 or self.max_new_tokens < 2 or \
                self.max_prompt_tokens < self.prompt_tokens:
            raise ValueError("Need prompts_per_domain >= 1, prompt_tokens >= 4, max_new_tokens >= 2 and "
                             "max_prompt_tokens >= prompt_tokens.")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}.")

    @property
    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


def log(message: str) -> None:
    print(f"[route {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ----- models ---------------------------------------------------------------------------------------------------


def resolve_models(args: RouteArguments) -> tuple[str, dict[str, str | None]]:
    """The target path and {arm name: checkpoint path, or None for `ngram`}, in the order of `args.drafters`."""
    from hf_specdec.drafters import lab_checkpoints

    target, available = (lab_checkpoints(args.lab) if args.lab else (args.target, {}))
    available = {**available, **dict(entry.split("=", 1) for entry in args.drafter)}
    names = args.drafters or (lab_domain_drafters(args.lab, available) if args.lab else list(available))
    unknown = [name for name in names if name != NGRAM and name not in available]
    if unknown:
        raise ValueError(f"Unknown drafters {unknown}; available: {sorted(available) + [NGRAM]}. Add checkpoints with "
                         "--drafter NAME=PATH.")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"Routing needs at least two distinct arms, got {names}.")
    return target, {name: None if name == NGRAM else available[name] for name in names}


def lab_domain_drafters(lab: str, available: dict[str, str]) -> list[str]:
    """The drafters a domains lab trains on one domain each (and on all): `distill-<domain>`, without the
    divergence baselines distill-fkl* / distill-tvd."""
    names = [name for name in available
             if name.startswith("distill-") and not name.startswith("distill-fkl") and name != "distill-tvd"]
    if len(names) < 2:
        raise ValueError(f"The lab at {lab} has no domain drafters (distill-<domain>; it has {sorted(available)}). "
                         "Build one with the lab's `domains` setting, or name the arms with --drafters (e.g. "
                         "--drafters sft distill-fkl ngram).")
    return names


def load_models(args: RouteArguments, target_path: str, arm_paths: dict[str, str | None]):
    """(tokenizer, target, {arm name: drafter}); every model in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdec import NGramDrafter
    from hf_specdec.drafters import load_drafter, load_drafter_model

    tokenizer_path = args.tokenizer or (str(Path(args.lab) / "tokenizer") if args.lab else target_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"No tokenizer at {tokenizer_path} ({error}); pass --tokenizer PATH.") from None
    device = args.resolved_device
    target = AutoModelForCausalLM.from_pretrained(target_path).to(device).eval()
    arms = {}
    for name, path in arm_paths.items():
        if path is None:
            arms[name] = NGramDrafter(**ngram_kwargs(args), num_draft_tokens=args.num_draft_tokens)
        else:
            model = load_drafter_model(path).to(device)
            arms[name] = load_drafter(path, model=model, num_draft_tokens=args.num_draft_tokens)
    return tokenizer, target, arms


def ngram_kwargs(args: RouteArguments) -> dict:
    return {"max_ngram": args.ngram_max, "min_ngram": args.ngram_min}


def stored_layers(args: RouteArguments, num_layers: int) -> list[int]:
    """The `hidden_states` indices whose features are stored: the given ones, or every other layer counting down
    from the last; a fixed `feature_layer` must be among them."""
    layers = sorted(set(args.feature_layers or range(num_layers, -1, -2)))
    if bad := [layer for layer in layers if not 0 <= layer <= num_layers]:
        raise ValueError(f"feature_layers {bad} are outside the target's hidden_states indices 0..{num_layers}.")
    if args.feature_layer is not None and args.feature_layer not in layers:
        raise ValueError(f"feature_layer {args.feature_layer} is not among the stored feature_layers {layers}; add "
                         "it to --feature_layers (that measures the prompts again).")
    return layers


# ----- prompts --------------------------------------------------------------------------------------------------


def fraction(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by `key`: the same on every machine and run."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def line_starts(text: str, prompt_start: str = "def") -> list[int]:
    return [match.start() for match in re.finditer(r"^\S", text, re.MULTILINE)]


def read_jsonl_split(directory: Path, name: str) -> list[dict]:
    with open(directory / f"{name}.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def lab_readers():
    """The lab's own corpus reader and prompt starts (`def` / `class` lines, or paragraphs of prose), so windows
    begin where the lab's held-out prompts begin; plain JSONL and line starts when the lab does not import."""
    try:
        from lab import prompt_starts, read_split
    except ImportError:  # an older lab.py, or the lab's training dependencies are missing
        return read_jsonl_split, line_starts
    return read_split, prompt_starts


def lab_stage_settings(lab: str, stage: str) -> dict:
    """The settings a lab stage was built with (its `lab_stage.json` marker); {} without one."""
    marker = Path(lab) / stage / "lab_stage.json"
    return json.loads(marker.read_text()).get("settings", {}) if marker.is_file() else {}


def corpus_prompts(args: RouteArguments, tokenizer) -> list[Prompt]:
    """`prompts_per_domain` windows of `prompt_tokens` tokens per domain from the lab's train split.

    A domains lab labels every corpus row with its domain; a single-domain lab's rows get its prompts' category.
    Windows start where the lab starts that domain's held-out prompts. Files are visited round-robin in a seeded
    hash order (one window per file before a second from any), so a larger `prompts_per_domain` gives the same
    first prompts plus new ones (and a resumed run measures only those)."""
    corpus_dir = Path(args.lab) / "corpus"
    if not (corpus_dir / "train.jsonl").is_file():
        raise ValueError(f"{corpus_dir} has no train.jsonl; is {args.lab} a complete lab output?")
    read_split, starts_of = lab_readers()
    single_domain = lab_stage_settings(args.lab, "prompts").get("category", DEFAULT_DOMAIN)
    prompt_start = {name: spec.get("prompt_start", "def")
                    for name, spec in (lab_stage_settings(args.lab, "corpus").get("domains") or {}).items()}
    by_domain: dict[str, list[dict]] = {}
    for row in read_split(corpus_dir, "train"):
        by_domain.setdefault(str(row.get("domain", single_domain)), []).append(row)
    domains = args.domains or sorted(by_domain)
    if missing := [domain for domain in domains if domain not in by_domain]:
        raise ValueError(f"The lab's corpus has no domains {missing}; it has {sorted(by_domain)}.")
    prompts = []
    for domain in domains:
        starts = {row["path"]: starts_of(row["text"], prompt_start.get(domain, "def")) for row in by_domain[domain]}
        found = domain_windows(args, tokenizer, domain, by_domain[domain], starts)
        if not found:
            raise ValueError(f"No file of domain {domain!r} is {args.prompt_tokens} tokens long; lower prompt_tokens.")
        if len(found) < args.prompts_per_domain:
            log(f"domain {domain!r}: only {len(found)} windows of {args.prompt_tokens} tokens (wanted "
                f"{args.prompts_per_domain})")
        prompts += found
    return prompts


def domain_windows(args: RouteArguments, tokenizer, domain: str, rows: list[dict],
                   starts: dict[str, list[int]]) -> list[Prompt]:
    rng = random.Random(f"{args.seed}:{domain}")
    files = []
    for row in sorted(rows, key=lambda r: fraction(f"route-order-{args.seed}", r["path"])):
        shuffled = list(starts[row["path"]])
        rng.shuffle(shuffled)
        files.append((row["text"], shuffled))
    prompts: list[Prompt] = []
    for round_index in range(max((len(file_starts) for _, file_starts in files), default=0)):
        for text, file_starts in files:
            if len(prompts) == args.prompts_per_domain:
                return prompts
            if round_index >= len(file_starts):
                continue
            ids = tokenizer(text[file_starts[round_index] :][: 16 * args.prompt_tokens],
                            add_special_tokens=False)["input_ids"]
            if len(ids) < args.prompt_tokens:
                continue
            prompts.append(Prompt(id=f"{domain}-{len(prompts) + 1:04d}", category=domain,
                                  text=tokenizer.decode(ids[: args.prompt_tokens])))
    return prompts


def gather_prompts(args: RouteArguments, tokenizer) -> list[Prompt]:
    if args.prompts_file is None:
        return corpus_prompts(args, tokenizer)
    prompts = load_prompts((args.prompts_file,), per_category=args.prompts_per_domain)
    if args.domains:
        prompts = [prompt for prompt in prompts if prompt.category in args.domains]
        if not prompts:
            raise ValueError(f"{args.prompts_file} has no prompts of categories {args.domains}.")
    if len({prompt.id for prompt in prompts}) != len(prompts):
        raise ValueError(f"{args.prompts_file}: prompt ids must be unique (the collection is resumed by id).")
    return prompts


def prompt_record(prompt: Prompt) -> dict:
    text = {"prompt": prompt.text} if prompt.messages is None else {"messages": list(prompt.messages)}
    return {"id": prompt.id, "domain": prompt.category, **text}


# ----- collection -----------------------------------------------------------------------------------------------


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def generated_tokens(new: torch.Tensor, eos: set[int]) -> int:
    """Tokens of a one-row generation up to and including its first EOS."""
    for index, token in enumerate(new.tolist()):
        if token in eos:
            return index + 1
    return len(new)


def timed_generate(target, inputs: dict, **kwargs):
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    start = time.perf_counter()
    out = target.generate(**inputs, do_sample=False, **kwargs)
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return out, time.perf_counter() - start


@torch.no_grad()
def measure_prompt(args: RouteArguments, target, arms: dict, inputs: dict, layers: list[int]) -> dict:
    """Plain decoding's and every arm's greedy generation of one prompt, and its features at `layers`.

    Times are the whole `generate()` call, as the benchmark suite times them, so tokens/s of plain decoding and of
    every arm compare like for like."""
    prompt_length, eos = inputs["input_ids"].shape[1], eos_ids(target)
    plain, seconds = timed_generate(target, inputs, max_new_tokens=args.max_new_tokens)
    plain_new = plain[0, prompt_length:]
    plain_tokens = generated_tokens(plain_new, eos)
    record = {"plain": {"new_tokens": plain_tokens, "seconds": seconds, "tokens_per_second": plain_tokens / seconds},
              "arms": {}}
    for name, drafter in arms.items():
        out, seconds = timed_generate(target, inputs, assistant_model=drafter, max_new_tokens=args.max_new_tokens,
                                      return_dict_in_generate=True)
        stats, new = out.spec_stats, out.sequences[0, prompt_length:]
        new_tokens = int(stats.new_tokens.sum())
        record["arms"][name] = {
            "acceptance_rate": stats.acceptance_rate, "tau": stats.mean_accepted_length,
            "tokens_per_second": new_tokens / seconds, "new_tokens": new_tokens, "seconds": seconds,
            "rounds": int(stats.rounds.sum()),
            # greedy speculative decoding reproduces plain decoding; a difference flags a float near-tie or a bug
            "matches_plain": bool(torch.equal(new[:new_tokens], plain_new[:plain_tokens])),
        }
    mask = inputs["attention_mask"]
    record["features"] = {f"layer_{layer}": prompt_features(target, inputs["input_ids"], mask, layer)[0].tolist()
                          for layer in layers}
    return record


def collection_settings(args: RouteArguments, target_path: str, arm_paths: dict, layers: list[int]) -> dict:
    """What determines a prompt's measurements: a resumed run must share it."""
    arms = {name: ngram_kwargs(args) if path is None else str(Path(path).resolve()) for name, path in arm_paths.items()}
    return {"target": str(Path(target_path).resolve()), "arms": arms, "max_prompt_tokens": args.max_prompt_tokens,
            "max_new_tokens": args.max_new_tokens,
            "num_draft_tokens": args.num_draft_tokens, "feature_layers": layers, "device": args.resolved_device,
            "threads": args.threads}


def read_collected(output_dir: Path, settings: dict, force: bool) -> dict[str, dict]:
    """{prompt id: record} of the prompts measured by earlier runs with the same settings."""
    collect, settings_file = output_dir / COLLECT_FILE, output_dir / SETTINGS_FILE
    if force:
        collect.unlink(missing_ok=True)
        settings_file.unlink(missing_ok=True)
    if collect.exists() and settings_file.exists():
        stored = json.loads(settings_file.read_text())
        if stored != settings:
            changed = sorted(key for key in settings.keys() | stored.keys() if settings.get(key) != stored.get(key))
            raise ValueError(f"{collect} was measured with other settings (changed: {changed}); pass --force to "
                             "measure every prompt again, or use another --output_dir.")
    settings_file.write_text(json.dumps(settings, indent=2))
    if not collect.exists():
        return {}
    lines = collect.read_text(encoding="utf-8").splitlines()
    records = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{collect}:{number} is not valid JSON; delete the line or pass --force.") from None
            # the last line of an interrupted run: drop it, and its prompt is measured again
            collect.write_text("".join(f"{kept}\n" for kept in lines[:-1]), encoding="utf-8")
            break
        records[record["id"]] = record
    return records


def collect(args: RouteArguments, tokenizer, target, arms: dict, prompts: list[Prompt], layers: list[int],
            settings: dict) -> tuple[list[dict], int]:
    """Every prompt's record (earlier runs' reused), in prompt order, and how many were measured now."""
    output_dir = Path(args.output_dir)
    done = read_collected(output_dir, settings, args.force)
    for prompt in prompts:
        stored = done.get(prompt.id)
        if stored is not None and {key: stored.get(key) for key in prompt_record(prompt)} != prompt_record(prompt):
            raise ValueError(f"{output_dir / COLLECT_FILE} holds another prompt under id {prompt.id!r} (the prompt "
                             "settings changed); pass --force to measure again, or use another --output_dir.")
    todo = [prompt for prompt in prompts if prompt.id not in done]
    log(f"{len(prompts)} prompts: {len(prompts) - len(todo)} measured before, {len(todo)} to measure")
    encoded = {prompt.id: encode(prompt, tokenizer, args.max_prompt_tokens) for prompt in todo}
    if todo:
        warm_up(target, arms, as_inputs(encoded[todo[0].id], target.device))
    with open(output_dir / COLLECT_FILE, "a", encoding="utf-8") as out:
        for prompt in tqdm(todo, desc="measuring", unit="prompt", disable=not todo):
            ids = encoded[prompt.id]
            record = {**prompt_record(prompt), "prompt_length": len(ids),
                      **measure_prompt(args, target, arms, as_inputs(ids, target.device), layers)}
            out.write(json.dumps(record) + "\n")
            out.flush()  # a line per finished prompt: an interrupted run loses at most the prompt in progress
            done[prompt.id] = record
    return [done[prompt.id] for prompt in prompts], len(todo)


def as_inputs(ids: list[int], device) -> dict:
    input_ids = torch.tensor([ids], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def warm_up(target, arms: dict, inputs: dict) -> None:
    """One short generation per method first, so lazy initialisation is not timed on the first prompt."""
    target.generate(**inputs, do_sample=False, max_new_tokens=4)
    for drafter in arms.values():
        target.generate(**inputs, do_sample=False, max_new_tokens=4, assistant_model=drafter)


def save_dataset(records: list[dict], directory: Path) -> None:
    from datasets import Dataset

    shutil.rmtree(directory, ignore_errors=True)
    Dataset.from_list(records).save_to_disk(str(directory))


# ----- training and evaluation ----------------------------------------------------------------------------------


def drafted_records(records: list[dict]) -> list[dict]:
    """The prompts on which every arm drafted: where the target ends right after the prompt (EOS first), there is
    no verification round, τ is undefined (0 in the statistics) and the prompt says nothing about the drafters."""
    return [record for record in records if all(arm["rounds"] > 0 for arm in record["arms"].values())]


def split_records(records: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out): in each domain, the `heldout_fraction` of its prompts first in the order of a hash of
    their ids (at least one when the domain has two), so every domain is in both and no prompt in two."""
    heldout_ids = set()
    for domain in sorted({record["domain"] for record in records}):
        ids = sorted((r["id"] for r in records if r["domain"] == domain), key=lambda i: fraction("route-heldout", i))
        count = max(round(heldout_fraction * len(ids)), 1) if len(ids) > 1 else 0
        heldout_ids.update(ids[:count])
    train = [record for record in records if record["id"] not in heldout_ids]
    heldout = [record for record in records if record["id"] in heldout_ids]
    if len(train) < 2 or not heldout:
        raise ValueError(f"{len(records)} prompts split into {len(train)} train and {len(heldout)} held-out "
                         f"(heldout_fraction={heldout_fraction}); measure more prompts (prompts_per_domain).")
    return train, heldout


def feature_matrix(records: list[dict], layer: int) -> torch.Tensor:
    return torch.tensor([record["features"][f"layer_{layer}"] for record in records])


def value_matrix(records: list[dict], arm_names: list[str], metric: str) -> torch.Tensor:
    return torch.tensor([[record["arms"][name][metric] for name in arm_names] for record in records],
                        dtype=torch.float64)


def fit(args: RouteArguments, records: list[dict], arm_names: list[str], layer: int) -> DrafterRouter:
    return train_router(feature_matrix(records, layer), value_matrix(records, arm_names, args.objective), layer,
                        arm_names, objective=args.objective, epochs=args.epochs, lr=args.learning_rate,
                        weight_decay=args.weight_decay, seed=args.seed, mlp_hidden_size=args.mlp_hidden_size,
                        dropout=args.dropout)


def select_router(args: RouteArguments, train: list[dict], heldout: list[dict], arm_names: list[str],
                  layers: list[int]) -> tuple[DrafterRouter, list[dict]]:
    """The router of the fixed `feature_layer`, or of the stored layer with the best held-out accuracy (then the
    lower held-out regret); and one row per layer tried."""
    tried, best = [], None
    for layer in ([args.feature_layer] if args.feature_layer is not None else layers):
        router = fit(args, train, arm_names, layer)
        scores = {split: evaluate_router(router, feature_matrix(rows, layer),
                                         value_matrix(rows, arm_names, args.objective))
                  for split, rows in (("heldout", heldout), ("train", train))}
        tried.append({"layer": layer, **{f"{split}_{key}": scores[split][key] for split in scores
                                         for key in ("accuracy", "regret", "relative_regret")}})
        key = (scores["heldout"]["accuracy"], -scores["heldout"]["regret"])
        if best is None or key > best[0]:
            best = (key, router)
    return best[1], tried


def split_evaluation(router: DrafterRouter, records: list[dict], arm_names: list[str]) -> dict:
    """{metric: routing_metrics} of the router's choices on `records`, by every metric (it was trained for one)."""
    chosen = router.choose(feature_matrix(records, router.config.feature_layer))
    return {metric: routing_metrics(chosen, value_matrix(records, arm_names, metric), arm_names)
            for metric in METRICS}


def domain_tables(router: DrafterRouter, records: list[dict], arm_names: list[str]) -> dict:
    """{domain (and "all"): {metric: routing_metrics} + plain tokens/s} of the router's choices."""
    domains = sorted({record["domain"] for record in records})
    tables = {}
    for domain in [*domains, "all"] if len(domains) > 1 else domains:
        rows = [record for record in records if domain in ("all", record["domain"])]
        table = split_evaluation(router, rows, arm_names)
        table["plain_tokens_per_second"] = sum(r["plain"]["tokens_per_second"] for r in rows) / len(rows)
        tables[domain] = table
    return tables


# ----- outputs --------------------------------------------------------------------------------------------------


def write_routing_file(output_dir: Path, target_path: str, arm_paths: dict, args: RouteArguments) -> dict:
    """`routing.json`, as `RoutedDrafter.from_pretrained(output_dir)` reads it: checkpoint paths relative to the
    output folder when inside it, absolute otherwise."""
    drafters = {}
    for name, path in arm_paths.items():
        if path is None:
            drafters[name] = {"kind": "ngram", **ngram_kwargs(args)}
            continue
        resolved = Path(path).resolve()
        inside = resolved.is_relative_to(output_dir.resolve())
        drafters[name] = {"kind": "checkpoint",
                          "path": str(resolved.relative_to(output_dir.resolve()) if inside else resolved)}
    spec = {"drafters": drafters, "router": "router", "target": str(Path(target_path).resolve())}
    (output_dir / "routing.json").write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    rule = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def metric_table(tables: dict, arm_names: list[str], metric: str) -> list[str]:
    label = METRIC_LABELS[metric]
    plain = metric == "tokens_per_second"
    header = ["domain", "prompts", *(["plain"] if plain else []), *arm_names, "routed", "oracle", "routed ÷ best arm"]
    rows = []
    for domain, scores in tables.items():
        m = scores[metric]
        rows.append([domain, str(m["prompts"]), *([fmt(scores["plain_tokens_per_second"], 1)] if plain else []),
                     *(fmt(m["single_arms"][name], 1 if plain else 2) for name in arm_names),
                     f"**{fmt(m['routed'], 1 if plain else 2)}**", fmt(m["oracle"], 1 if plain else 2),
                     fmt(m["routed_over_best_single"], 3)])
    return [f"{label} per prompt, averaged:", "", *table(header, rows)]


def build_report(args: RouteArguments, argv: list[str], arm_names: list[str], layers_tried: list[dict],
                 router: DrafterRouter, results: dict, counts: dict, timings: dict) -> tuple[str, dict]:
    objective = METRIC_LABELS[args.objective]
    command = "python recipes/route.py " + shlex.join(argv)
    setup = (
        f"Arms: {', '.join(f'`{name}`' for name in arm_names)}; γ = {args.num_draft_tokens}, greedy, "
        f"{args.max_new_tokens} new tokens per prompt. Prompts: {counts['prompts']} "
        f"({', '.join(f'{d}: {n}' for d, n in counts['per_domain'].items())}; {counts['without_rounds']} left out "
        f"where the target ended at once), {counts['train']} to train the router and {counts['heldout']} held out "
        f"(per domain, by a hash of the prompt id). The router predicts each arm's {objective} from the target's"
        f" `hidden_states[{router.config.feature_layer}]` pooled over the prompt, and picks the "
        "highest. Oracle = each prompt's best arm; tokens/s time the whole `generate()` call (one measurement per "
        "prompt and arm, so single prompts are noisy)."
    )
    layer_rows = [[str(row["layer"]) + (" ←" if row["layer"] == router.config.feature_layer else ""),
                   fmt(row["heldout_accuracy"], 3), fmt(row["heldout_regret"], 3), fmt(row["train_accuracy"], 3),
                   fmt(row["train_regret"], 3)] for row in layers_tried]
    layer_note = (
        f"Regret in {objective} (oracle − routed). The layer is chosen by held-out accuracy, so the held-out numbers "
        "below are slightly optimistic when several layers were tried."
    )
    lines = ["# Routing report", "", setup, "", "## Feature layer", "",
             *table(["layer", "held-out accuracy", "held-out regret", "train accuracy", "train regret"], layer_rows),
             "", layer_note, ""]
    for split, title in (("heldout", "Held-out prompts (the router never trained on them)"),
                         ("train", "Train prompts")):
        result = results[split]
        m = result["overall"][args.objective]
        lines += [f"## {title}", "",
                  f"Accuracy {fmt(m['accuracy'], 3)} (chosen arm = the oracle's; ties count as right; every arm "
                  f"ties on {fmt(100 * m['all_arms_tied'], 0)}% of the prompts); regret "
                  f"{fmt(m['regret'], 3)} {objective} ({fmt(100 * m['relative_regret'], 1)}% of the oracle); "
                  f"routed ÷ oracle {fmt(m['routed_over_oracle'], 3)}; routed ÷ best single arm "
                  f"(`{m['best_single_arm']}`) {fmt(m['routed_over_best_single'], 3)}. Chosen: "
                  + ", ".join(f"`{name}` {count}" for name, count in m["chosen_counts"].items()) + ".", ""]
        for metric in (args.objective, *(x for x in METRICS if x != args.objective)):
            lines += [*metric_table(result["domains"], arm_names, metric), ""]
        lines += ["Chosen arms per domain: " + "; ".join(
            f"{domain}: " + ", ".join(f"`{n}` {c}" for n, c in scores[args.objective]["chosen_counts"].items())
            for domain, scores in result["domains"].items() if domain != "all") + ".", ""]
    lines += ["## Time and reproduction", "",
              ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()) + ".", "",
              f"Greedy outputs equal to plain decoding: {counts['matches_plain']} of {counts['arm_runs']} runs.", "",
              "```", command, "```", ""]
    payload = {"arguments": asdict(args), "command": command, "arms": arm_names,
               "feature_layer": router.config.feature_layer, "layers_tried": layers_tried, "counts": counts,
               "results": results, "timings": timings}
    return "\n".join(lines), payload


def prompt_counts(records: list[dict], without_rounds: int, train: list[dict], heldout: list[dict],
                  measured: int) -> dict:
    arm_runs = [arm for record in records for arm in record["arms"].values()]
    domains = sorted({record["domain"] for record in records})
    return {"prompts": len(records), "without_rounds": without_rounds, "train": len(train), "heldout": len(heldout),
            "measured_this_run": measured,
            "per_domain": {domain: sum(record["domain"] == domain for record in records) for domain in domains},
            "arm_runs": len(arm_runs), "matches_plain": sum(arm["matches_plain"] for arm in arm_runs)}


# ----- main -----------------------------------------------------------------------------------------------------


def run_route(args: RouteArguments, argv: list[str] | None = None) -> dict:
    """Collect (resuming), train, evaluate and report. Returns the report's JSON payload."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target_path, arm_paths = resolve_models(args)
    arm_names = list(arm_paths)
    tokenizer, target, arms = load_models(args, target_path, arm_paths)
    layers = stored_layers(args, target.config.get_text_config().num_hidden_layers)
    prompts = gather_prompts(args, tokenizer)
    settings = collection_settings(args, target_path, arm_paths, layers)
    records, measured = collect(args, tokenizer, target, arms, prompts, layers, settings)
    save_dataset(records, output_dir / "measurements")
    timings = {"measuring": time.perf_counter() - start}

    train_start = time.perf_counter()
    drafted = drafted_records(records)
    if len(drafted) < len(records):
        log(f"{len(records) - len(drafted)} prompts where the target ended at once (no drafting round) are left out")
    train, heldout = split_records(drafted, args.heldout_fraction)
    router, layers_tried = select_router(args, train, heldout, arm_names, layers)
    router.save_pretrained(output_dir / "router")
    routing = write_routing_file(output_dir, target_path, arm_paths, args)
    timings["training"] = time.perf_counter() - train_start
    timings["total"] = time.perf_counter() - start

    results = {}
    for split, rows in (("heldout", heldout), ("train", train)):
        results[split] = {"overall": split_evaluation(router, rows, arm_names),
                          "domains": domain_tables(router, rows, arm_names)}
    counts = prompt_counts(records, len(records) - len(drafted), train, heldout, measured)
    argv = list(sys.argv[1:] if argv is None else argv)
    markdown, payload = build_report(args, argv, arm_names, layers_tried, router, results, counts, timings)
    payload["routing"] = routing
    (output_dir / "route_report.md").write_text(markdown)
    (output_dir / "route_report.json").write_text(json.dumps(payload, indent=2, default=str))
    print("\n" + markdown)
    log(f"router in {output_dir / 'router'}, drafters in {output_dir / 'routing.json'}, report in "
        f"{output_dir / 'route_report.md'}; load with RoutedDrafter.from_pretrained({str(output_dir)!r})")
    return payload


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = parse_args((RouteArguments,), argv)
    return run_route(args, argv)


if __name__ == "__main__":
    main()
