"""`algorithm.cepo` through verl's config conversion, and the rows of a batch that are verl's padding.

verl converts its `algorithm` section with `omega_conf_to_dataclass`, which builds the class named by
`algorithm._target_` (verl's `AlgoConfig`, which has no `cepo` field: `TypeError: unexpected keyword argument
'cepo'`). `CEPOAlgoConfig` is verl's `AlgoConfig` with a `cepo` mapping; the CEPO trainer points
`algorithm._target_` at it before anything converts the config (`use_cepo_algo_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import open_dict
from verl.trainer.config import AlgoConfig

__all__ = ["CEPOAlgoConfig", "CEPO_ALGO_TARGET", "canonical_order", "real_rows", "use_cepo_algo_config"]

CEPO_ALGO_TARGET = "cepo_kernels.integrations.verl.config.CEPOAlgoConfig"
_VERL_ALGO_TARGETS = ("", "verl.trainer.config.AlgoConfig", "verl.trainer.config.algorithm.AlgoConfig")


@dataclasses.dataclass
class CEPOAlgoConfig(AlgoConfig):
    """verl's `AlgoConfig` plus `cepo`: the CEPO options (`CEPOSettings` checks them)."""

    cepo: dict[str, Any] = dataclasses.field(default_factory=dict)


def use_cepo_algo_config(config) -> None:
    """Points `config.algorithm._target_` (verl's whole config, a DictConfig) at `CEPOAlgoConfig` when it
    names verl's own `AlgoConfig` (or nothing); a user's own target is left alone."""
    algorithm = config.algorithm
    target = algorithm.get("_target_", "") or ""
    if target not in _VERL_ALGO_TARGETS and target != CEPO_ALGO_TARGET:
        return
    with open_dict(algorithm):
        algorithm._target_ = CEPO_ALGO_TARGET


def real_rows(tags) -> list[int]:
    """Positions of the rows that are not verl's padding (`upsample_batch_to_divisible_size` tags the rows it
    adds `is_padding`): those never enter the r- choice, the teacher passes or the CEPO metrics."""
    return [i for i, tag in enumerate(tags) if not (tag or {}).get("is_padding", False)]


def canonical_order(keys: list[str]) -> list[str]:
    """verl's TransferQueue keys (`{uid}_{session}_{index}`, the agent loop's) in an order that does not
    depend on how verl balanced the batch over its data-parallel ranks: r- is the first of a group's tied
    rollouts, so the rows must reach the r- choice in the same order whatever the number of ranks."""

    def order(key: str):
        uid, _, rest = key.partition("_")
        return uid, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rest.split("_")]

    return sorted(keys, key=order)
