"""EAGLE-3 checkpoint formats: read both published layouts, write either.

- **speculators** (vLLM's native input; Red Hat's `speculators`): `config.json` with `speculators_model_type:
  "eagle3"`, the layer's config under `transformer_layer_config`, `eagle_aux_hidden_state_layer_ids` as
  `hidden_states` indices (k = output of decoder layer k - 1), `norm_before_residual` (vLLM assumes True when the
  key is missing, and so do we), `norm_before_fc`, `fc_norm`, `norm_output`, `speculators_config` (algorithm,
  proposal, verifier); weights `fc`, `layers.0.*`, `norm`, `lm_head`, `d2t`, `t2d`, often `embed_tokens` (a copy of
  the target's), `verifier_*` (ignored).
- **eagle3** (native: EAGLE, SpecForge, SGLang): a flat Llama-style `config.json` with `architectures:
  ["LlamaForCausalLMEagle3"]`, `vocab_size` (the target's), `draft_vocab_size`, `target_hidden_size`,
  `eagle_config.eagle_aux_hidden_state_layer_ids` as "output of decoder layer k" (hidden_states index k + 1;
  SGLang reads only these), and in our exports also a top-level `eagle_aux_hidden_state_layer_ids` in vLLM's
  convention (vLLM reads it first); weights `fc`, `midlayer.*` (SGLang loads only these names), `norm`,
  `lm_head`, `d2t`, `t2d`. SGLang ignores `norm_before_residual` (always the raw residual).

Configs are read as data: a checkpoint's Python files (`auto_map`) are never imported and nothing needs
`trust_remote_code`. Weights come from safetensors, or from `pytorch_model.bin` with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from transformers import AutoConfig, LlamaConfig
from transformers.utils import cached_file

from .modeling import Eagle3Config, Eagle3DraftModel

SPECULATORS, NATIVE = "speculators", "eagle3"
FORMATS = (SPECULATORS, NATIVE)
NATIVE_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_VERSION = "0.9.0"  # the release whose layout we write and check exports against
IGNORED_WEIGHTS = ("verifier_lm_head.", "verifier_norm.", "rotary_emb.")
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias",
                 "pad_token_id", "bos_token_id", "eos_token_id")


# ---------------------------------------------------------------------------------------------------- reading
def checkpoint_format(config: dict) -> str | None:
    """"speculators", "eagle3" (native) or None for a config dict that is not an EAGLE-3 head."""
    if config.get("speculators_model_type") == "eagle3":
        return SPECULATORS
    if NATIVE_ARCHITECTURE in (config.get("architectures") or []) or "eagle_config" in config:
        return NATIVE
    return None


def is_eagle3_checkpoint(name_or_path: str, **hub_kwargs) -> bool:
    config = _read_config(name_or_path, **hub_kwargs)
    return config is not None and checkpoint_format(config) is not None


HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def load_eagle3(name_or_path: str, dtype: torch.dtype | str | None = None, device=None,
                **hub_kwargs) -> Eagle3DraftModel:
    """An `Eagle3DraftModel` from a local folder or Hub id in either format (detected from `config.json`)."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"Eagle3DraftModel.from_pretrained got unexpected arguments {unknown}; it takes dtype, device "
                        f"and the Hub's {list(HUB_KWARGS)}.")
    name_or_path = str(name_or_path)
    config = _read_config(name_or_path, **hub_kwargs)
    if config is None:
        raise OSError(f"{name_or_path} has no config.json: not a checkpoint folder or Hub id.")
    kind = checkpoint_format(config)
    if kind is None:
        raise ValueError(f"{name_or_path} is not an EAGLE-3 head: its config.json has neither "
                         f"`speculators_model_type: \"eagle3\"` (speculators / vLLM) nor `architectures: "
                         f"[\"{NATIVE_ARCHITECTURE}\"]` (EAGLE / SpecForge / SGLang).")
    weights = _read_weights(name_or_path, **hub_kwargs)
    head_config = (_config_from_speculators(config) if kind == SPECULATORS else
                   _config_from_native(config, weights))
    weights = {key.replace("midlayer.", "layers.0.", 1) if key.startswith("midlayer.") else key: value
               for key, value in weights.items() if not key.startswith(IGNORED_WEIGHTS)}
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight comes from the checkpoint: skip the random initialisation
        model = Eagle3DraftModel(head_config)
    _load_weights(model, weights, name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    dtype = _saved_dtype(config) if dtype in (None, "auto") else dtype
    return model.to(device=device, dtype=dtype).eval()


def _read_config(name_or_path: str, **hub_kwargs) -> dict | None:
    path = _resolve(name_or_path, "config.json", **hub_kwargs)
    if path is None:
        return None
    with open(path) as handle:
        return json.load(handle)


def _resolve(name_or_path: str, filename: str, **hub_kwargs) -> str | None:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def _read_weights(name_or_path: str, **hub_kwargs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = _resolve(name_or_path, "model.safetensors", **hub_kwargs)
    if single is not None:
        return load_file(single)
    index = _resolve(name_or_path, "model.safetensors.index.json", **hub_kwargs)
    if index is not None:
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_file(_resolve(name_or_path, shard, **hub_kwargs)))
        return weights
    legacy = _resolve(name_or_path, "pytorch_model.bin", **hub_kwargs)
    if legacy is not None:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise OSError(f"{name_or_path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")


def _config_from_speculators(config: dict) -> Eagle3Config:
    layer = dict(config["transformer_layer_config"])
    model_type = layer.pop("model_type", "qwen3")  # speculators' default layer type
    if model_type not in ("llama", "qwen3"):
        raise ValueError(f"EAGLE-3 heads with a {model_type!r} layer are not supported yet (llama and qwen3 are).")
    verifier = (config.get("speculators_config") or {}).get("verifier") or {}
    return Eagle3Config(
        transformer_layer_config=AutoConfig.for_model(model_type, **layer),
        draft_vocab_size=config.get("draft_vocab_size"),
        target_hidden_size=config.get("target_hidden_size"),
        aux_hidden_state_layer_ids=config.get("eagle_aux_hidden_state_layer_ids"),
        draft_length=_proposed_length(config),
        norm_before_residual=config.get("norm_before_residual", True),  # vLLM's reading of a missing key
        norm_before_fc=config.get("norm_before_fc", False),
        fc_norm=config.get("fc_norm", False),
        norm_output=config.get("norm_output", False),
        verifier_name_or_path=verifier.get("name_or_path"),
    )


def _proposed_length(config: dict) -> int | None:
    methods = (config.get("speculators_config") or {}).get("proposal_methods") or [{}]
    return methods[0].get("speculative_tokens")


def _config_from_native(config: dict, weights: dict) -> Eagle3Config:
    target_vocab = int(weights["t2d"].shape[0]) if "t2d" in weights else config["vocab_size"]
    fields = {key: config[key] for key in _LLAMA_FIELDS if config.get(key) is not None}
    layer = LlamaConfig(vocab_size=target_vocab, num_hidden_layers=1, tie_word_embeddings=False, **fields,
                        **_rope_fields(config))
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    # nested (SGLang, SpecForge): "output of decoder layer k" = hidden_states[k + 1]; a top-level key alone is
    # vLLM's hidden_states index
    ids = [int(k) + 1 for k in nested] if nested is not None else config.get("eagle_aux_hidden_state_layer_ids")
    return Eagle3Config(
        transformer_layer_config=layer,
        draft_vocab_size=config.get("draft_vocab_size") or target_vocab,
        target_hidden_size=config.get("target_hidden_size"),
        aux_hidden_state_layer_ids=ids,
        norm_before_residual=config.get("norm_before_residual", False),
        norm_before_fc=config.get("norm_before_fc", False),  # (as speculators' converter reads them)
        fc_norm=config.get("fc_norm", False),
        norm_output=config.get("norm_output", False),
        verifier_name_or_path=config.get("verifier_name_or_path"),
    )


def _rope_fields(config: dict) -> dict:
    """RoPE settings of a flat Llama config, in the form this transformers release takes."""
    if config.get("rope_parameters") is not None:
        return {"rope_parameters": config["rope_parameters"]}
    scaling = dict(config.get("rope_scaling") or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {"rope_parameters": {**scaling, "rope_theta": config.get("rope_theta", 10000.0)}}


def _load_weights(model: Eagle3DraftModel, weights: dict, name_or_path: str) -> None:
    config = model.config
    embedding = weights.pop("embed_tokens.weight", None)  # a copy of the target's; the target's replaces it
    if "d2t" not in weights:
        if config.draft_vocab_size != config.vocab_size:
            raise ValueError(f"{name_or_path} has a draft vocabulary of {config.draft_vocab_size} of the target's "
                             f"{config.vocab_size} tokens but no `d2t` mapping.")
        weights["d2t"] = torch.zeros(config.draft_vocab_size, dtype=torch.long)  # the identity
    weights["d2t"] = weights["d2t"].long()
    targets = torch.arange(len(weights["d2t"])) + weights["d2t"]
    if len(targets) != config.draft_vocab_size or int(targets.min()) < 0 or int(targets.max()) >= config.vocab_size:
        raise ValueError(f"{name_or_path}: `d2t` maps draft ids outside the target's vocabulary of {config.vocab_size} "
                         f"tokens (or has {len(targets)} entries for draft_vocab_size={config.draft_vocab_size}).")
    weights["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool).index_fill_(0, targets, True)  # from d2t
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name_or_path} does not match its config: missing weights {sorted(missing)}, unexpected "
                         f"{sorted(unexpected)}.")
    if embedding is not None and tuple(embedding.shape) == (config.vocab_size, config.hidden_size):
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(embedding.float(), freeze=True))


def _saved_dtype(config: dict) -> torch.dtype:
    layer = config.get("transformer_layer_config") or {}
    name = config.get("dtype") or config.get("torch_dtype") or layer.get("dtype") or layer.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


# ---------------------------------------------------------------------------------------------------- writing
def save_eagle3(model: Eagle3DraftModel, directory: str, format: str = SPECULATORS, save_embedding: bool = False,
                state_dict: dict | None = None, num_draft_tokens: int | None = None,
                verifier_name_or_path: str | None = None, is_main_process: bool = True,
                safe_serialization: bool = True, max_shard_size=None, push_to_hub: bool = False, **unknown) -> None:
    """Write `model` for vLLM (`format="speculators"`) or SGLang / SpecForge / EAGLE (`format="eagle3"`).
    The embedding is the target's and is left out unless `save_embedding`. `verifier_name_or_path` names the
    target in the export (the Hub id a server loads; default: the one the head was made for)."""
    if unknown:
        raise TypeError(f"save_pretrained got unexpected arguments {sorted(unknown)}.")
    if push_to_hub:
        raise ValueError("Save the head, then upload the folder (`huggingface_hub.upload_folder`), or call "
                         "head.push_to_hub(repo_id): save_pretrained(push_to_hub=True) is not supported.")
    if not safe_serialization:
        raise ValueError("EAGLE-3 heads are written as safetensors only (what vLLM and SGLang read).")
    if verifier_name_or_path is not None:
        model.config.verifier_name_or_path = verifier_name_or_path
    if not is_main_process:  # (under FSDP / DeepSpeed every process calls save; one writes)
        return
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}: 'speculators' for vLLM and speculators, "
                         "'eagle3' for SGLang, SpecForge and EAGLE.")
    os.makedirs(directory, exist_ok=True)
    weights = {key: value.detach().contiguous()
               for key, value in (model.state_dict() if state_dict is None else state_dict).items()}
    if save_embedding:
        if model.get_input_embeddings() is None:
            raise ValueError("save_embedding=True needs the target's embedding: head.attach_target(target) first.")
        weights["embed_tokens.weight"] = model.get_input_embeddings().weight.detach().contiguous()
    if format == SPECULATORS:
        # the proposal's draft length: as asked, else what the head was trained for, else speculators' default
        num_draft_tokens = num_draft_tokens or model.config.draft_length or 3
        config = speculators_config(model.config, num_draft_tokens, model.dtype)
    else:
        config = native_config(model.config, model.dtype)
        weights = {("midlayer." + key[len("layers.0."):]) if key.startswith("layers.0.") else key: value
                   for key, value in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def speculators_config(config: Eagle3Config, num_draft_tokens: int, dtype: torch.dtype) -> dict:
    """The config.json speculators writes (and vLLM reads) for this head; every key vLLM reads is explicit."""
    import transformers

    layer = config.transformer_layer_config.to_diff_dict()
    layer.setdefault("model_type", config.transformer_layer_config.model_type)
    verifier = config.verifier_name_or_path
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_draft_tokens}],
            "verifier": {"name_or_path": verifier, "architectures": _verifier_architectures(verifier)},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": config.aux_hidden_state_layer_ids,
        "norm_before_residual": config.norm_before_residual,
        "norm_before_fc": config.norm_before_fc,
        "fc_norm": config.fc_norm,
        "norm_output": config.norm_output,
        "embed_requires_grad": False,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }


def native_config(config: Eagle3Config, dtype: torch.dtype) -> dict:
    """The flat config.json of native EAGLE-3 checkpoints (SGLang's `LlamaForCausalLMEagle3`)."""
    layer = config.transformer_layer_config
    if layer.model_type != "llama" or config.norm_before_fc or config.fc_norm or config.norm_output:
        raise ValueError("The native EAGLE-3 format holds a plain Llama layer without norm_before_fc / fc_norm / "
                         "norm_output; save this head with format='speculators'.")
    if config.aux_hidden_state_layer_ids is None:
        raise ValueError("Set `config.aux_hidden_state_layer_ids` before exporting: native checkpoints name their "
                         "target layers.")
    if config.norm_before_residual:
        warnings.warn("This head uses norm_before_residual=True. The native config records it (vLLM reads the "
                      "key), but SGLang and SpecForge ignore it and use the raw residual, so they would draft "
                      "badly with this head (still losslessly). Serve it with vLLM (format='speculators'), or train "
                      "heads for SGLang with norm_before_residual=False (our default).", stacklevel=3)
    rope = dict(getattr(layer, "rope_parameters", None) or {})
    fields = {key: getattr(layer, key) for key in _LLAMA_FIELDS if getattr(layer, key, None) is not None}
    return {
        "architectures": [NATIVE_ARCHITECTURE],
        "model_type": "llama",
        **fields,
        "num_hidden_layers": 1,
        "vocab_size": layer.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else
        {key: value for key, value in rope.items() if key != "rope_theta"},
        "tie_word_embeddings": False,
        # SGLang reads the nested ids as "output of decoder layer k" = hidden_states[k + 1]; vLLM reads the
        # top-level key first, as hidden_states indices: both are written, each in its reader's convention
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [k - 1 for k in config.aux_hidden_state_layer_ids],
                         "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": list(config.aux_hidden_state_layer_ids),
        "norm_before_residual": config.norm_before_residual,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _verifier_architectures(name_or_path: str | None) -> list[str]:
    if not name_or_path:
        return []
    config = _read_config(name_or_path) if os.path.isdir(name_or_path) else None
    return list((config or {}).get("architectures") or [])
