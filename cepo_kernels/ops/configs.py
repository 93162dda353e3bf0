"""Launch configs of the logits kernels: fixed defaults, an optional per-GPU table, opt-in autotuning.

Order of precedence for a CUDA tensor: `override(...)` (tests, the compile report, the tuning sweep) >
the table entry for this card (`torch.cuda.get_device_name`) > DEFAULTS. The table is a JSON file,
{card name: {kernel key: {"BLOCK_V": int, "num_warps": int}}}, at $CEPO_KERNELS_CONFIGS or else
`configs.json` beside this module (written by bench/tune_logits.py, run by bench/run_device.sh). It is
read lazily, at the first launch on a GPU: never at import and never for CPU tensors (which run under
Triton's interpreter with INTERPRETER). CEPO_KERNELS_AUTOTUNE=1 (ops/logits.py) autotunes over SWEEP
instead.

Kernel keys: logprobs_fwd (token_logprobs), cepo_fwd_x1 / _x2 / _x3 (the loss forward reading 1, 2 or 3
logits tensors per token), logits_bwd (every backward).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

from cepo_kernels.runfiles import atomic_write

KEYS = ("logprobs_fwd", "cepo_fwd_x1", "cepo_fwd_x2", "cepo_fwd_x3", "logits_bwd")
DEFAULTS = {
    "logprobs_fwd": {"BLOCK_V": 4096, "num_warps": 8},
    "cepo_fwd_x1": {"BLOCK_V": 4096, "num_warps": 8},
    "cepo_fwd_x2": {"BLOCK_V": 4096, "num_warps": 8},
    "cepo_fwd_x3": {"BLOCK_V": 4096, "num_warps": 8},
    "logits_bwd": {"BLOCK_V": 4096, "num_warps": 8},
}
# Under the CPU interpreter the cost is per tile, not per element: fewer, larger tiles run faster there.
INTERPRETER = {"BLOCK_V": 2048, "num_warps": 1}
# The candidates of the GPU sweep (bench/tune_logits.py) and of opt-in autotuning: 8 to 32 elements per
# thread per tile. `python bench/compile_report.py --sweep` compiles each for sm_90: none spills (with
# triton 3.9; 16384 x 16 warps spills 80-432 bytes when 2-3 tensors are read, so it is not offered there).
_CANDIDATES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
SWEEP = {key: [{"BLOCK_V": bv, "num_warps": nw} for bv, nw in _CANDIDATES
               if not (key in ("cepo_fwd_x2", "cepo_fwd_x3") and bv == 16384)] for key in KEYS}
TABLE_PATH = Path(__file__).with_name("configs.json")

_override = contextvars.ContextVar("cepo_kernels_config_override", default=None)
_tables = {}  # path -> parsed table
_cards = {}  # device index -> name


def table_path():
    return Path(os.environ.get("CEPO_KERNELS_CONFIGS") or TABLE_PATH)


def load_table(path=None):
    """The parsed table ({} when the file does not exist); a malformed file raises naming it."""
    path = Path(path) if path is not None else table_path()
    if path not in _tables:
        table = {}
        if path.exists():
            try:
                table = json.loads(path.read_text())
                for entries in table.values():
                    for key, cfg in entries.items():
                        check_config(key, cfg)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: expected {{card: {{kernel: {{BLOCK_V, num_warps}}}}}}: {e}") from e
        _tables[path] = table
    return _tables[path]


def check_config(key, cfg):
    if key not in KEYS:
        raise ValueError(f"unknown kernel key {key!r}, expected one of {KEYS}")
    if not isinstance(cfg, dict) or set(cfg) != {"BLOCK_V", "num_warps"}:
        raise ValueError(f"{key}: expected {{'BLOCK_V': int, 'num_warps': int}}, got {cfg!r}")
    for name, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{key}.{name}: expected a power of two, got {v!r}")


def card_name(device):
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cards:
        _cards[index] = torch.cuda.get_device_name(index)
    return _cards[index]


def get(key, device):
    """{"BLOCK_V", "num_warps"} for kernel `key` on tensors of `device` (a torch.device)."""
    forced = (_override.get() or {}).get(key)
    if forced is not None:
        return dict(forced)
    if device.type == "cpu":
        return dict(INTERPRETER)
    if device.type == "cuda":
        entry = load_table().get(card_name(device), {}).get(key)
        if entry is not None:
            return dict(entry)
    return dict(DEFAULTS[key])


@contextlib.contextmanager
def override(configs):
    """Inside the block, launches of these kernel keys use these configs (any device)."""
    for key, cfg in configs.items():
        check_config(key, cfg)
    token = _override.set({**(_override.get() or {}), **configs})
    try:
        yield
    finally:
        _override.reset(token)


def write_table(card, entries, path=None):
    """Merges {kernel key: config} for `card` into the JSON table at `path` (other cards kept)."""
    path = Path(path) if path is not None else table_path()
    for key, cfg in entries.items():
        check_config(key, cfg)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[card] = {**table.get(card, {}), **entries}
    atomic_write(path, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    _tables.pop(path, None)
    return table
