"""The logits kernels' launch configs (cepo_kernels/ops/configs.py) and the GPU sweep's table writing
(bench/tune_logits.py, run with a stand-in timing function: the real one needs a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, ulps32

import cepo_kernels
import cepo_ref
from cepo_kernels.ops import configs

ROOT = Path(__file__).resolve().parent.parent


def load_tuner():
    spec = importlib.util.spec_from_file_location("tune_logits", ROOT / "bench" / "tune_logits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "configs.json"
    monkeypatch.setenv("CEPO_KERNELS_CONFIGS", str(path))
    monkeypatch.setattr(configs, "card_name", lambda device: "Fake H200")
    yield path
    configs._tables.clear()


def test_defaults_without_a_table(table):
    cuda = torch.device("cuda", 0)
    for key in configs.KEYS:
        assert configs.get(key, cuda) == configs.DEFAULTS[key]
        assert configs.get(key, torch.device("cpu")) == configs.INTERPRETER


def test_sweep_writes_the_fastest_config_per_card_and_the_launchers_read_it(table):
    tuner = load_tuner()
    table.write_text(json.dumps({"Other GPU": {"logits_bwd": {"BLOCK_V": 2048, "num_warps": 4}}}))

    def fake_ms(key, cfg):  # fastest: 8192 x 8 for the forwards; the backward's 16384 is "rejected"
        if key == "logits_bwd" and cfg["BLOCK_V"] == 16384:
            return None
        return abs(cfg["BLOCK_V"] - 8192) / 1024 + abs(cfg["num_warps"] - 8) + (key == "logits_bwd")

    results = tuner.sweep(configs.KEYS, fake_ms, "Fake H200")
    assert results["cepo_fwd_x3"]["best"] == {"BLOCK_V": 8192, "num_warps": 8}
    assert len(results["logits_bwd"]["ms"]) == len(configs.SWEEP["logits_bwd"]) - 1
    written = json.loads(table.read_text())
    assert written["Other GPU"] == {"logits_bwd": {"BLOCK_V": 2048, "num_warps": 4}}  # kept
    assert written["Fake H200"] == {k: {"BLOCK_V": 8192, "num_warps": 8} for k in configs.KEYS}
    cuda = torch.device("cuda", 0)
    assert configs.get("cepo_fwd_x1", cuda) == {"BLOCK_V": 8192, "num_warps": 8}
    with configs.override({"cepo_fwd_x1": {"BLOCK_V": 1024, "num_warps": 2}}):
        assert configs.get("cepo_fwd_x1", cuda) == {"BLOCK_V": 1024, "num_warps": 2}
        assert configs.get("cepo_fwd_x1", torch.device("cpu")) == {"BLOCK_V": 1024, "num_warps": 2}
    assert configs.get("cepo_fwd_x1", torch.device("cpu")) == configs.INTERPRETER


def test_malformed_table_and_config_raise(table):
    table.write_text(json.dumps({"Fake H200": {"cepo_fwd_x1": {"BLOCK_V": 1000, "num_warps": 8}}}))
    with pytest.raises(ValueError, match="configs.json"):
        configs.get("cepo_fwd_x1", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="unknown kernel key"):
        with configs.override({"cepo_fwd": {"BLOCK_V": 1024, "num_warps": 4}}):
            pass


def test_overridden_config_gives_the_same_results():
    """A config from the table changes only the tiling: same loss and gradient (CPU interpreter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1000, generator=g)
    tg = torch.randint(0, 1000, (2, 3), generator=g)
    adv, mask = torch.randn(2, generator=g), torch.ones(2, 3, dtype=torch.bool)
    # teachers that disagree (a shift of x would give Delta = 0 exactly in exact arithmetic, and torch's own
    # float32 error, the yardstick below, then vanishes by luck)
    pos, neg = (x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2))

    def run(impl=cepo_kernels, dtype=torch.float32):
        leaf = x.to(dtype).clone().requires_grad_()
        kw = {"metrics": False} if impl is cepo_kernels else {}
        out = impl.cepo_loss(leaf, tg, adv.to(dtype), mask, pos_logits=pos.to(dtype),
                             neg_logits=neg.to(dtype), **kw)
        out.loss.backward()
        return out.loss, leaf.grad

    base = run()
    small = {k: {"BLOCK_V": 256, "num_warps": 4} for k in configs.KEYS}
    with configs.override(small):
        tiled = run()
    # both tilings by the house rule against float64 (another tiling only reorders the fp32 sums)
    ref64, ref32 = run(cepo_ref, torch.float64), run(cepo_ref)
    for i, name in enumerate(("loss", "gradient")):
        for got in (base[i], tiled[i]):
            assert_close(got, ref64[i], ref32[i], atol=ulps32(ref64[i]), name=name)


def test_import_reads_no_table_and_does_not_import_the_training_loop():
    code = ("import sys, cepo_kernels; from cepo_kernels.ops import configs; "
            "assert not configs._tables and not configs._cards; "
            "assert not any(m.startswith('cepo_kernels.rl') for m in sys.modules), sorted(sys.modules); "
            "from cepo_kernels.ops.advantages import group_advantages; "
            "assert group_advantages is cepo_kernels.group_advantages")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("switch", ["", "native", "interpreter", "triton"])
def test_every_entry_point_on_a_cpu_without_the_interpreter(switch):
    """Without a GPU and without TRITON_INTERPRET=1, every launching entry point runs its native CPU kernels
    (CEPO_KERNELS_CPU unset or "native"); CEPO_KERNELS_CPU=interpreter raises the same clear ValueError
    naming TRITON_INTERPRET at each (not Triton's "0 active drivers"), an unknown value one naming
    CEPO_KERNELS_CPU; group_advantages (plain torch) runs in every case."""
    code = """
import os, torch, cepo_kernels as ck
assert not torch.cuda.is_available()
x, t = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
adv, mask, lp = torch.tensor([0.5, -0.5]), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 3)
h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
calls = {
    "token_logprobs": lambda: ck.token_logprobs(x, t),
    "cepo_advantages": lambda: ck.cepo_advantages(adv, lp, lp + 1, mask, lam=0.5),
    "cepo_loss": lambda: ck.cepo_loss(x, t, adv, mask, pos_logits=x, neg_logits=x),
    "grpo_loss": lambda: ck.grpo_loss(x, t, adv, mask),
    "linear_logprobs": lambda: ck.linear_logprobs(h, w, t),
    "linear_teacher_logprobs": lambda: ck.linear_teacher_logprobs(h, h, w, t),
    "linear_cepo_loss": lambda: ck.linear_cepo_loss(h, w, t, adv, mask, pos_hidden=h, neg_logp=lp),
    "linear_grpo_loss": lambda: ck.linear_grpo_loss(h, w, t, adv, mask),
}
switch = os.environ.get("CEPO_KERNELS_CPU", "")
for name, call in calls.items():
    try:
        call()
    except ValueError as e:
        msg = {"interpreter": "CEPO_KERNELS_CPU=interpreter runs the Triton kernels through Triton's "
                              "interpreter: expected TRITON_INTERPRET=1",
               "triton": "CEPO_KERNELS_CPU: expected 'native' or 'interpreter', got 'triton'"}.get(switch)
        assert msg and str(e).startswith(msg), (name, e)
    else:
        assert switch in ("", "native"), name + " ran without the interpreter"
assert ck.group_advantages(torch.tensor([1.0, 0.0]), 2).shape == (2,)
print("ok", len(calls))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CEPO_KERNELS_CPU")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if switch:
        env["CEPO_KERNELS_CPU"] = switch
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "8"], proc.stderr[-3000:]
