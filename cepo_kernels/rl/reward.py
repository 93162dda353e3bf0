"""`--reward-fn module:function`: a user's reward function loaded by name."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from cepo_kernels.rl.errors import RewardFunctionError
from cepo_kernels.step import safe_rewards

log = logging.getLogger("cepo_kernels.rl")


def load_reward_fn(spec: str):
    """A reward function from "module:function" (the module is looked up in the current directory
    first, then on the Python path) or "path/to/file.py:function"."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise ValueError(f"reward_fn: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if source.endswith(".py") or os.sep in source or "/" in source:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"reward_fn: file {source!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"cepo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(source)
    except ValueError:
        raise
    except ImportError as e:
        raise ValueError(
            f"reward_fn: cannot import {source!r} ({e}); looked in {os.getcwd()} and on the Python path"
        ) from None
    except Exception as e:  # the user's module failed while loading (syntax error, ...)
        raise ValueError(f"reward_fn: loading {source!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward_fn: {source!r} has no attribute {name!r}")
    if not callable(fn):
        raise TypeError(f"reward_fn: {spec!r} is not callable")
    return fn


def score_responses(reward_fn, texts: list[str], references: list[str], step: int) -> tuple[list[float], int]:
    """The reward of every response of (1-based) `step` and the number of failures: a raising call scores 0,
    with a warning; RewardFunctionError when every call raised."""
    failures = []
    rewards, errors = safe_rewards(reward_fn, texts, references, failures=failures)
    if errors == len(texts):
        raise RewardFunctionError(f"step {step}: the reward function raised on every one of the {len(texts)} "
                                  f"responses; first error: {failures[0]}")
    if errors:
        log.warning("step %d: the reward function raised on %d of %d responses (scored 0); first error: %s",
                    step, errors, len(texts), failures[0])
    return rewards, errors
