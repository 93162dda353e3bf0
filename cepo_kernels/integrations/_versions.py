"""The supported version range of an adapter's library, checked before anything of it is imported."""

from __future__ import annotations

import importlib
import os


def require_version(package: str, lo: str, below: str, *, extra: str, allow_env: str, why: str = "",
                    name: str | None = None):
    """ImportError naming the range when `package` is missing or outside [lo, below); `allow_env`=1 in
    the environment accepts another version (at the user's risk)."""
    adapter, name = f"cepo_kernels.integrations.{extra}", name or package
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{adapter} needs {name} (>= {lo}, < {below}): "
                          f"`pip install '{package}>={lo},<{below}'` (or, in a clone of cepo_kernels, "
                          f"`pip install -e \".[{extra}]\"`) ({e})") from e
    from packaging.version import Version

    found = Version(Version(mod.__version__).base_version)
    if not Version(lo) <= found < Version(below) and os.environ.get(allow_env) != "1":
        raise ImportError(
            f"{adapter} supports {name} >= {lo}, < {below}; found {package} {mod.__version__}. Install a "
            f"supported version (pip install '{package}>={lo},<{below}') or set {allow_env}=1 to try it "
            f"anyway{f' ({why})' if why else ''}."
        )
    return mod
