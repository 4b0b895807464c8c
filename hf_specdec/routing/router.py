"""DrafterRouter: from a prompt's pooled target hidden states, predict how well each drafter will do on it.

The router is a small MLP over the features of `features.py` (the target's own prefill states at
`config.feature_layer`, mean-pooled over the prompt's real tokens). It predicts one value per drafter — τ (tokens per
verification round) or tokens per second, whichever `config.objective` says — and `choose` picks the drafter with
the highest prediction. Features and values are standardised with statistics of the training data that are stored as
buffers, so they travel with the weights through `save_pretrained` / `from_pretrained` / `push_to_hub`.

    router = train_router(features, values, feature_layer=2, drafter_names=["code", "prose"])
    router.save_pretrained("out/route/router")
    router = AutoModel.from_pretrained("out/route/router")      # registered at import
    arms = router.choose(features)                               # LongTensor [B]: index into drafter_names
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

OBJECTIVES = ("tau", "tokens_per_second")
# A feature or value that is constant over the training data has std 0; dividing by this instead keeps it at 0.
MIN_STD = 1e-6


class DrafterRouterConfig(PretrainedConfig):
    """Configuration of a `DrafterRouter`.

    Args:
        drafter_names: the arms, in the order of the router's outputs (`choose` returns indices into this list).
        hidden_size: width of the features: the target's hidden size.
        feature_layer: the target's `hidden_states` index the features are pooled from (0 = embeddings, i = output
            of decoder layer i).
        mlp_hidden_size: width of the MLP's hidden layer.
        objective: what the router predicts per arm: "tau" (tokens per verification round, the same on every
            machine) or "tokens_per_second" (measured speed, specific to the machine it was measured on).
        dropout: dropout on the MLP's hidden layer while training.
    """

    model_type = "hf_specdec_router"

    drafter_names: list[str] | None = None
    hidden_size: int | None = None
    feature_layer: int | None = None
    mlp_hidden_size: int = 64
    objective: str = "tau"
    dropout: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.drafter_names is not None:
            names = list(self.drafter_names)
            if len(names) < 2 or not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"drafter_names must list at least two non-empty names (the arms to choose "
                                 f"between), got {self.drafter_names!r}.")
            if len(set(names)) != len(names):
                raise ValueError(f"drafter_names has repeated names: {names}.")
            self.drafter_names = names
        if self.hidden_size is not None and self.hidden_size <= 0:
            raise ValueError(f"hidden_size (the target's hidden size) must be positive, got {self.hidden_size}.")
        if self.feature_layer is not None and (isinstance(self.feature_layer, bool) or self.feature_layer < 0):
            raise ValueError(f"feature_layer is a `hidden_states` index (0 = embeddings, i = output of decoder layer "
                             f"i) and must be >= 0, got {self.feature_layer!r}.")
        if self.mlp_hidden_size <= 0:
            raise ValueError(f"mlp_hidden_size must be positive, got {self.mlp_hidden_size}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; choose one of {list(OBJECTIVES)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    @property
    def num_drafters(self) -> int:
        return len(self.drafter_names)


@dataclass
class DrafterRouterOutput(ModelOutput):
    """`predictions` [B, K] in standardised units (per arm: (value − mean) / std of the training values); `loss`
    their mean squared error against the labels, when labels were given."""

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


class DrafterRouter(PreTrainedModel):
    """Standardise the features → Linear → GELU → Linear to one predicted value per drafter.

    `forward(features, labels=None)` works in standardised units (what training needs); `predict` and `choose`
    are what generation uses: real units, eval mode, no gradient, any input device or dtype.
    """

    config_class = DrafterRouterConfig
    base_model_prefix = ""
    main_input_name = "features"

    def __init__(self, config: DrafterRouterConfig):
        super().__init__(config)
        if config.drafter_names is None or config.hidden_size is None or config.feature_layer is None:
            raise ValueError("A DrafterRouter needs `drafter_names`, `hidden_size` and `feature_layer` in its config; "
                             "train one with `train_router(features, values, feature_layer, drafter_names)`.")
        hidden, arms = config.hidden_size, config.num_drafters
        # Persistent buffers: the training data's statistics are part of the model, saved with the weights.
        self.register_buffer("feature_mean", torch.zeros(hidden))
        self.register_buffer("feature_std", torch.ones(hidden))
        self.register_buffer("value_mean", torch.zeros(arms))
        self.register_buffer("value_std", torch.ones(arms))
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.mlp_hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.mlp_hidden_size, arms),
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # Statistics start as the identity transform; `init.*` leaves anything loaded from a checkpoint alone.
        if module is self:
            init.zeros_(self.feature_mean)
            init.ones_(self.feature_std)
            init.zeros_(self.value_mean)
            init.ones_(self.value_std)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # torch's own default for Linear
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def set_normalization(self, features: torch.Tensor, values: torch.Tensor) -> None:
        """Store the mean and std of the training features [N, H] and of each arm's values [N, K]."""
        self._check_features(features)
        self._check_values(values, len(features))
        features, values = features.float(), values.float()
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0, unbiased=False).clamp(min=MIN_STD))
        self.value_mean.copy_(values.mean(0))
        self.value_std.copy_(values.std(0, unbiased=False).clamp(min=MIN_STD))

    def standardize_values(self, values: torch.Tensor) -> torch.Tensor:
        return (values.to(self.value_mean) - self.value_mean) / self.value_std

    # ------------------------------------------------------------------ forward and decisions
    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> DrafterRouterOutput:
        """`features` [B, H]; `labels` [B, K] in real units (standardised here). Predictions are standardised."""
        self._check_features(features)
        normalized = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        predictions = self.mlp(normalized.to(self.mlp[0].weight.dtype)).float()
        loss = None
        if labels is not None:
            self._check_values(labels, len(features))
            loss = nn.functional.mse_loss(predictions, self.standardize_values(labels).float())
        return DrafterRouterOutput(loss=loss, predictions=predictions)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] features (any device or dtype) → [B, K] float32 predicted values in real units, on the router's
        device. Runs in eval mode (no dropout) and restores the training mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            predictions = self(features.to(self.feature_mean.device)).predictions
        finally:
            self.train(was_training)
        return predictions * self.value_std.float() + self.value_mean.float()

    @torch.no_grad()
    def choose(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] features → LongTensor [B]: for each row, the index (into `config.drafter_names`) of the drafter
        with the highest predicted value."""
        return self.predict(features).argmax(-1)

    # ------------------------------------------------------------------ checks
    def _check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"The router expects features of shape [batch, {self.config.hidden_size}] (the target's hidden states "
                f"at hidden_states[{self.config.feature_layer}], pooled with `pool_prompt_states`), got "
                f"{tuple(features.shape)}. Was it trained for another target?"
            )

    def _check_values(self, values: torch.Tensor, rows: int) -> None:
        if values.shape != (rows, self.config.num_drafters):
            raise ValueError(f"Values must have shape [{rows}, {self.config.num_drafters}] (one column per drafter, in "
                             f"the order {self.config.drafter_names}), got {tuple(values.shape)}.")
        if not torch.isfinite(values).all():
            raise ValueError("Values contain NaN or infinity; drop prompts whose measurements failed.")


def register_auto_classes() -> None:
    AutoConfig.register(DrafterRouterConfig.model_type, DrafterRouterConfig, exist_ok=True)
    AutoModel.register(DrafterRouterConfig, DrafterRouter, exist_ok=True)


register_auto_classes()


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


def train_router(
    features: torch.Tensor,
    values: torch.Tensor,
    feature_layer: int,
    drafter_names: list[str],
    objective: str = "tau",
    epochs: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    mlp_hidden_size: int = 64,
    dropout: float = 0.0,
    batch_size: int | None = None,
) -> DrafterRouter:
    """A router fitted to `values` [N, K] (each drafter's measured value on each prompt, real units) from
    `features` [N, H], with AdamW on the mean squared error in standardised units.

    `batch_size=None` trains full-batch (N is a few hundred prompts); otherwise mini-batches in a seeded order. The
    same arguments give the same router, and the global RNG is left untouched. Returned in eval mode, on the CPU.
    """
    features, values = torch.as_tensor(features).float().cpu(), torch.as_tensor(values).float().cpu()
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"features must be [N, hidden_size] with N >= 2 prompts, got {tuple(features.shape)}.")
    if epochs < 1 or lr <= 0:
        raise ValueError(f"Need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}.")
    config = DrafterRouterConfig(drafter_names=list(drafter_names), hidden_size=features.shape[1],
                                 feature_layer=feature_layer, mlp_hidden_size=mlp_hidden_size, objective=objective,
                                 dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = DrafterRouter(config)
        router.set_normalization(features, values)
        optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
        step = len(features) if batch_size is None else batch_size
        router.train()
        for _ in range(epochs):
            order = torch.randperm(len(features)) if batch_size else torch.arange(len(features))
            for start in range(0, len(features), step):
                rows = order[start : start + step]
                loss = router(features[rows], labels=values[rows]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return router.eval()


def routing_metrics(chosen: torch.Tensor, values: torch.Tensor, drafter_names: list[str]) -> dict:
    """How good the choices `chosen` [N] are, given every arm's measured `values` [N, K] (higher is better).

    accuracy: share of prompts whose chosen arm is an oracle arm (a tie with the best counts as right);
    all_arms_tied: share of prompts on which every arm has the same value (any choice is right there).
    routed / oracle / single_arms: mean value of the chosen arms, of each prompt's best arm, of always one arm.
    regret: oracle − routed (relative_regret divides it by the oracle); routed_over_oracle and
    routed_over_best_single: the routed mean over the oracle's and over the best single arm's.
    """
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    chosen = torch.as_tensor(chosen).long().cpu()
    if values.dim() != 2 or values.shape[1] != len(drafter_names) or chosen.shape != (len(values),):
        raise ValueError(f"Need values [N, {len(drafter_names)}] and chosen [N]; got {tuple(values.shape)} and "
                         f"{tuple(chosen.shape)}.")
    if len(values) == 0:
        raise ValueError("No prompts to evaluate the router on.")
    routed_values = values.gather(1, chosen[:, None])[:, 0]
    oracle_values = values.max(1).values
    single = {name: values[:, index].mean().item() for index, name in enumerate(drafter_names)}
    routed, oracle = routed_values.mean().item(), oracle_values.mean().item()
    best_single_name = max(single, key=single.get)
    counts = torch.bincount(chosen, minlength=len(drafter_names)).tolist()
    return {
        "prompts": len(values),
        "accuracy": (routed_values == oracle_values).double().mean().item(),
        "all_arms_tied": (values.min(1).values == oracle_values).double().mean().item(),
        "routed": routed,
        "oracle": oracle,
        "single_arms": single,
        "best_single_arm": best_single_name,
        "regret": oracle - routed,
        "relative_regret": (oracle - routed) / oracle if oracle else 0.0,
        "routed_over_oracle": routed / oracle if oracle else 0.0,
        "routed_over_best_single": routed / single[best_single_name] if single[best_single_name] else 0.0,
        "chosen_counts": dict(zip(drafter_names, counts)),
    }


def evaluate_router(router: DrafterRouter, features: torch.Tensor, values: torch.Tensor) -> dict:
    """`routing_metrics` of the router's own choices on `features` [N, H], against measured `values` [N, K]."""
    return routing_metrics(router.choose(torch.as_tensor(features)), values, router.config.drafter_names)
