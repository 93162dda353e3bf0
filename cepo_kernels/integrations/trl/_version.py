"""The supported TRL range, checked before anything of TRL is imported."""

from __future__ import annotations

from cepo_kernels.integrations._versions import require_version

__all__ = ["TRL_MIN", "TRL_BELOW", "check_trl_version"]

TRL_MIN, TRL_BELOW = "1.16", "1.17"


def check_trl_version():
    """ImportError with the supported range when TRL is missing or outside it (checked at import)."""
    require_version("trl", TRL_MIN, TRL_BELOW, extra="trl", allow_env="CEPO_TRL_ALLOW_ANY_VERSION",
                    why="CEPOTrainer overrides private GRPOTrainer methods", name="TRL")
