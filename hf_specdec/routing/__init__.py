"""Adaptive routing: pick, per prompt, the drafter expected to do best, from the target's own prefill states.

    from hf_specdec.routing import DrafterRouter, prompt_features, train_router
    features = prompt_features(target, input_ids, attention_mask, layer=2)     # [B, H]
    router = train_router(features, measured_tau, feature_layer=2, drafter_names=["code", "prose"])
    router.choose(features)                                                      # LongTensor [B]

`recipes/route.py` measures the drafters, trains the router and writes the `routing.json` that `RoutedDrafter`
loads; importing this package registers `DrafterRouter` with `AutoConfig` / `AutoModel`. `OnlinePolicy` (policy.py)
lets a routed row switch drafters, or stop drafting, while it generates.
"""

from .features import pool_prompt_states, prompt_features
from .policy import OnlinePolicy
from .router import (
    OBJECTIVES,
    DrafterRouter,
    DrafterRouterConfig,
    DrafterRouterOutput,
    evaluate_router,
    register_auto_classes,
    routing_metrics,
    train_router,
)

__all__ = [
    "OBJECTIVES",
    "DrafterRouter",
    "DrafterRouterConfig",
    "DrafterRouterOutput",
    "OnlinePolicy",
    "evaluate_router",
    "pool_prompt_states",
    "prompt_features",
    "register_auto_classes",
    "routing_metrics",
    "train_router",
]
