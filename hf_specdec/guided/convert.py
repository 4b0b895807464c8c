"""Convert SD² checkpoints in the paper's published format to `GuidedDrafter`s, and back.

The published format (ETH-DISCO/SD-square `upload_to_hf.py`) is two files:

- `pytorch_model.bin`: `torch.save` of the Lightning module's state dict without the verifier (`v_base.*`):
  `d_base.<drafter keys>` (a steered layer's own keys gain a `.l.` segment: `d_base.model.layers.3.l.mlp...`),
  `guidance_embd_layer.orig.{weight,bias}` (the fusion; absent when it is the identity),
  `latent_mod_prep.norm.{weight,bias}` + `latent_mod_prep.w_guide.weight` (merged/simple), and for `advanced`
  `d_base.model.layers.{i}.bias_proj.{0,2}.weight` (the per-layer two-layer MLP).
- `config.json`: the Lightning hyper-parameters (`method`, `drafter`, `verifier`, `guide_method`, `v_layer`,
  `d_layer`, `ngram`, ...), not a transformers config. An int `v_layer=k` means hidden_states `[k - 1]`.

The drafter's architecture is not in the checkpoint: it comes from `drafter_model` (a model, a config, or a path
or Hub id) or else from the `drafter` Hub id in the hyper-parameters. Its weights come from the `d_base.*` keys.

    python -m hf_specdec.guided.convert <sd2 dir or hub id> <output dir> [--drafter <config path or hub id>]
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .modeling import GuidedDrafter, GuidedDrafterConfig

WEIGHTS_NAME = "pytorch_model.bin"
HPARAMS_NAME = "config.json"
_STEERED_KEY = re.compile(r"^d_base\.model\.layers\.(\d+)\.l\.(.*)$")
_BIAS_PROJ_KEY = re.compile(r"^d_base\.model\.layers\.(\d+)\.bias_proj\.([02])\.weight$")
_OUR_LAYER_KEY = re.compile(r"^drafter\.model\.layers\.(\d+)\.(.*)$")
_IGNORED = re.compile(r"^v_base\.|rotary_emb\.")  # the verifier (never published) and recomputed RoPE buffers


def load_sd2_checkpoint(
    path_or_hub_id: str, drafter_model=None, dtype: torch.dtype | None = None, **hub_kwargs
) -> GuidedDrafter:
    """A `GuidedDrafter` from an SD² checkpoint directory or Hub id (see the module docstring)."""
    state_dict, hparams = _read_sd2_files(path_or_hub_id, **hub_kwargs)
    return from_sd2_state_dict(state_dict, hparams, drafter_model=drafter_model, dtype=dtype)


def convert_sd2_checkpoint(src: str, dst: str, drafter_model=None, **save_kwargs) -> GuidedDrafter:
    """Convert an SD² checkpoint (directory or Hub id) to our format in `dst` (`GuidedDrafter.from_pretrained`)."""
    model = load_sd2_checkpoint(src, drafter_model=drafter_model)
    model.save_pretrained(dst, **save_kwargs)
    return model


def from_sd2_state_dict(state_dict: dict, hparams: dict, drafter_model=None, dtype=None) -> GuidedDrafter:
    hparams = _flat_hparams(hparams)
    method = hparams.get("method", "guided-drafter")
    if method != "guided-drafter":
        raise ValueError(
            f"This SD² checkpoint was trained with method={method!r}, not a guided drafter. An "
            "'independent-drafter' checkpoint is a plain distilled drafter: load its `d_base.*` weights into the "
            "drafter model instead."
        )
    state_dict = {key: value for key, value in state_dict.items() if not _IGNORED.search(key)}
    guide_method = hparams.get("guide_method", "merged")
    steered = sorted({int(m.group(1)) for key in state_dict if (m := _STEERED_KEY.match(key))})
    if not steered:
        raise ValueError("No steered drafter layer found: expected keys like 'd_base.model.layers.0.l.mlp...'.")
    drafter_config = _drafter_config(drafter_model, hparams)
    config = GuidedDrafterConfig(
        drafter_config=drafter_config,
        verifier_hidden_size=_verifier_hidden_size(state_dict),
        verifier_layers=_verifier_layers(hparams.get("v_layer")),
        guide_method=guide_method,
        drafter_layers="all" if steered == list(range(drafter_config.num_hidden_layers)) else steered,
        verifier_name_or_path=hparams.get("verifier"),
        draft_length=hparams.get("ngram"),
    )
    _check_declared_drafter_layers(hparams.get("d_layer"), steered)
    converted = _to_our_keys(state_dict, config)
    dtype = dtype or next(v.dtype for v in converted.values() if v.is_floating_point())
    with no_init_weights():
        model = GuidedDrafter(config)
    model.to(dtype)
    _fill_absent(converted, model, drafter_model)
    _check_matches(model, converted)
    model.load_state_dict(converted, strict=False)
    model.tie_weights()
    return model.eval()


def to_sd2_checkpoint(model: GuidedDrafter, dst: str | None = None, **extra_hparams) -> tuple[dict, dict]:
    """The inverse conversion: `(state_dict, hparams)` in the published layout, written to `dst` when given."""
    config = model.config
    steered = set(config.steered_layers)
    slot_to_layer = dict(enumerate(config.steered_layers))
    state_dict = {}
    for key, value in model.state_dict().items():
        if key.startswith("drafter."):
            layer = _OUR_LAYER_KEY.match(key)
            if layer and int(layer.group(1)) in steered:
                key = f"drafter.model.layers.{layer.group(1)}.l.{layer.group(2)}"
            state_dict["d_base." + key[len("drafter.") :]] = value
        elif key.startswith("guide.layer_mlps."):
            slot, part = key[len("guide.layer_mlps.") :].split(".")[:2]
            state_dict[f"d_base.model.layers.{slot_to_layer[int(slot)]}.bias_proj.{part}.weight"] = value
        else:
            state_dict[_OUR_TO_SD2_GUIDE[key]] = value
    hparams = {
        "method": "guided-drafter",
        "drafter": config.drafter_config._name_or_path or None,
        "verifier": config.verifier_name_or_path,
        "guide_method": config.guide_method,
        "v_layer": list(config.verifier_layers),
        "d_layer": config.drafter_layers,
        "ngram": config.draft_length or 8,
        **extra_hparams,
    }
    if dst is not None:
        os.makedirs(dst, exist_ok=True)
        torch.save(state_dict, os.path.join(dst, WEIGHTS_NAME))
        with open(os.path.join(dst, HPARAMS_NAME), "w") as f:
            json.dump(hparams, f, indent=2)
    return state_dict, hparams


_OUR_TO_SD2_GUIDE = {
    "guide.fusion.weight": "guidance_embd_layer.orig.weight",
    "guide.fusion.bias": "guidance_embd_layer.orig.bias",
    "guide.norm.weight": "latent_mod_prep.norm.weight",
    "guide.norm.bias": "latent_mod_prep.norm.bias",
    "guide.projection.weight": "latent_mod_prep.w_guide.weight",
}
_SD2_TO_OUR_GUIDE = {sd2: ours for ours, sd2 in _OUR_TO_SD2_GUIDE.items()}


# ----- reading -----------------------------------------------------------------------------------------------------


def _read_sd2_files(path_or_hub_id: str, **hub_kwargs) -> tuple[dict, dict]:
    if os.path.isdir(path_or_hub_id):
        weights, hparams = (os.path.join(path_or_hub_id, name) for name in (WEIGHTS_NAME, HPARAMS_NAME))
        for path in (weights, hparams):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path_or_hub_id} is not an SD² checkpoint: {os.path.basename(path)} missing.")
    else:
        from huggingface_hub import hf_hub_download

        weights = hf_hub_download(path_or_hub_id, WEIGHTS_NAME, **hub_kwargs)
        hparams = hf_hub_download(path_or_hub_id, HPARAMS_NAME, **hub_kwargs)
    with open(hparams) as f:
        hparams_dict = json.load(f)
    return torch.load(weights, map_location="cpu", weights_only=True), hparams_dict


def _flat_hparams(hparams: dict) -> dict:
    """Lightning may nest the module's arguments (`{"model": {...}}` / `init_args`); take the level that has them."""
    for key in ("model", "init_args", "hparams"):
        if "guide_method" not in hparams and isinstance(hparams.get(key), dict):
            return _flat_hparams(hparams[key])
    return hparams


def _drafter_config(drafter_model, hparams: dict) -> PretrainedConfig:
    if isinstance(drafter_model, PreTrainedModel):
        return drafter_model.config
    if isinstance(drafter_model, PretrainedConfig):
        return drafter_model
    source = drafter_model or hparams.get("drafter")
    if not source:
        raise ValueError("The SD² checkpoint names no drafter: pass `drafter_model=` (a model, config or path).")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ValueError(
            f"Could not load the drafter's config from {source!r} (the SD² checkpoint stores only weights). Pass "
            "`drafter_model=` with the drafter's model, config or a local path."
        ) from error


def _verifier_layers(v_layer) -> list[int]:
    if v_layer is None:
        raise ValueError("The SD² hyper-parameters have no `v_layer`: cannot tell which target layers guide.")
    if isinstance(v_layer, str):
        v_layer = json.loads(v_layer)
    if isinstance(v_layer, int):
        return [v_layer - 1]  # an int k means the input of layer k - 1 (the SD² code's convention)
    return [int(i) for i in v_layer]


def _verifier_hidden_size(state_dict: dict) -> int:
    for key in ("latent_mod_prep.norm.weight", "guidance_embd_layer.orig.bias"):
        if key in state_dict:
            return state_dict[key].shape[0]
    bias_proj = next((v for k, v in state_dict.items() if k.endswith("bias_proj.0.weight")), None)
    if bias_proj is not None:
        return bias_proj.shape[0]
    raise ValueError("Cannot find the verifier hidden size: no latent_mod_prep / guidance_embd_layer / bias_proj.")


def _check_declared_drafter_layers(d_layer, steered: list[int]) -> None:
    if isinstance(d_layer, str) and d_layer != "all":
        d_layer = json.loads(d_layer)
    if isinstance(d_layer, list) and sorted(d_layer) != steered:
        raise ValueError(f"d_layer={d_layer} in the hyper-parameters, but the weights steer layers {steered}.")


def _to_our_keys(state_dict: dict, config: GuidedDrafterConfig) -> dict:
    slot_of_layer = {layer: slot for slot, layer in enumerate(config.steered_layers)}
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if steered := _STEERED_KEY.match(key):
            converted[f"drafter.model.layers.{steered.group(1)}.{steered.group(2)}"] = value
        elif bias_proj := _BIAS_PROJ_KEY.match(key):
            slot = slot_of_layer[int(bias_proj.group(1))]
            converted[f"guide.layer_mlps.{slot}.{bias_proj.group(2)}.weight"] = value
        elif key.startswith("d_base."):
            converted["drafter." + key[len("d_base.") :]] = value
        elif key in _SD2_TO_OUR_GUIDE:
            converted[_SD2_TO_OUR_GUIDE[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unknown keys in the SD² checkpoint (not d_base / guidance / latent_mod_prep): {unknown}")
    return converted


def _fill_absent(converted: dict, model: GuidedDrafter, drafter_model) -> None:
    """An identity fusion may be left out of the checkpoint; a frozen drafter's weights may come from the model."""
    if "guide.fusion.weight" not in converted:
        if model.guide.num_states != 1:
            raise ValueError("The checkpoint has no `guidance_embd_layer` but several verifier layers to fuse.")
        hidden = model.config.verifier_hidden_size
        converted["guide.fusion.weight"] = torch.eye(hidden)
        converted["guide.fusion.bias"] = torch.zeros(hidden)
    if isinstance(drafter_model, PreTrainedModel):
        for key, value in drafter_model.state_dict().items():
            converted.setdefault("drafter." + key, value)


def _check_matches(model: GuidedDrafter, converted: dict) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - set(converted) - tied)
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(converted[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(converted)
        if converted[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        problems = {"missing": missing, "unexpected": unexpected, "checkpoint vs drafter shapes": mismatched}
        details = "; ".join(
            f"{name}: {keys[:4]}{'...' if len(keys) > 4 else ''}" for name, keys in problems.items() if keys
        )
        raise ValueError(
            f"The SD² checkpoint does not match the drafter architecture (guide_method="
            f"{model.config.guide_method!r}): {details}. Pass the drafter it was trained from as `drafter_model`."
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert an SD² (steered drafter) checkpoint to a GuidedDrafter.")
    parser.add_argument("src", help="SD² checkpoint directory (pytorch_model.bin + config.json) or Hub id")
    parser.add_argument("dst", help="output directory for GuidedDrafter.from_pretrained")
    parser.add_argument("--drafter", default=None, help="drafter config path or Hub id (default: from config.json)")
    args = parser.parse_args(argv)
    convert_sd2_checkpoint(args.src, args.dst, drafter_model=args.drafter)
    print(f"Wrote a GuidedDrafter to {args.dst}")


if __name__ == "__main__":
    main()
