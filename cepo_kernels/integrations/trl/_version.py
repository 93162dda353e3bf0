"""The supported TRL range, checked before anything of TRL is imported."""

from __future__ import annotations

import os

__all__ = ["TRL_MIN", "TRL_BELOW", "check_trl_version"]

TRL_MIN, TRL_BELOW = "1.16", "1.17"


def check_trl_version():
    """ImportError with the supported range when TRL is missing or outside it (checked at import)."""
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            "cepo_kernels.integrations.trl needs TRL (>= 1.16, < 1.17): pip install 'cepo_kernels[trl]'"
        ) from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not Version(TRL_MIN) <= Version(v.base_version) < Version(TRL_BELOW) and os.environ.get(
        "CEPO_TRL_ALLOW_ANY_VERSION"
    ) != "1":
        raise ImportError(
            f"cepo_kernels.integrations.trl supports TRL >= {TRL_MIN}, < {TRL_BELOW}; "
            f"found trl {trl.__version__}. Install a supported version "
            f"(pip install 'trl>={TRL_MIN},<{TRL_BELOW}') or set CEPO_TRL_ALLOW_ANY_VERSION=1 to try it"
            " anyway (CEPOTrainer overrides private GRPOTrainer methods)."
        )
