"""EAGLE-3 heads: the drafter format vLLM, SGLang, SpecForge and speculators produce and serve.

from hf_specdec.eagle3 import Eagle3DraftModel
head = Eagle3DraftModel.from_pretrained("path/or/hub-id")   # speculators or native EAGLE-3 checkpoints
target.generate(**inputs, assistant_model=head)             # the target's embedding is shared at start
head.save_pretrained("out/head", format="speculators")      # or format="eagle3" (native, SGLang / SpecForge)
"""

from .modeling import Eagle3Config, Eagle3DraftModel, Eagle3Output, default_aux_layer_ids, register_auto_classes

register_auto_classes()

__all__ = ["Eagle3Config", "Eagle3DraftModel", "Eagle3Output", "default_aux_layer_ids", "register_auto_classes"]
