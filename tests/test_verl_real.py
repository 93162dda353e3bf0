"""CEPO, RLSD and GRPO inside verl's own trainer on a CPU (tests/verl_real_harness.py): local Ray (bounded
logical CPUs), a TransferQueue server (one storage unit), verl's FSDP2 actor worker group on two
data-parallel ranks (gloo, sdpa), the trainer `get_trainer_cls` returns, KL in the loss, two steps each, a
batch that verl pads. Stubbed: the rollout server, the reward loop, the checkpoint engine."""


import pytest

for _module in ("verl", "ray", "transfer_queue", "pandas"):
    pytest.importorskip(_module, reason="needs verl 0.9.x, Ray and TransferQueue with a transformers verl "
                        "accepts: CI runs this in a second venv (.ci/run, .ci/constraints-verl.txt)")

from verl_helpers import transformers_verl_accepts  # noqa: E402

if not transformers_verl_accepts():
    pytest.skip("verl's trainer needs a transformers verl accepts (verl 0.9.1: >=5.5.3,!=5.6.0,<5.11); CI "
                "runs this in .venv-verl (.ci/run)", allow_module_level=True)

import torch  # noqa: E402
from helpers import assert_close  # noqa: E402

import cepo_ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
WATCHDOG_S = 900  # the whole module (Ray, four runs, shutdown): past this, stacks are dumped and it exits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import verl_real_harness as H

    tmp = tmp_path_factory.mktemp("verl_real")
    with H.ray_session(tmp, WATCHDOG_S):
        out = {}
        with H.transfer_queue(tmp):
            with pytest.MonkeyPatch.context() as mp:
                out["cepo"] = H.run(mp, tmp, "cepo", 2, 2, lam0=0.5, t_warm=1)  # lambda: 0.5, then 0
            with pytest.MonkeyPatch.context() as mp:
                out["rlsd"] = H.run(mp, tmp, "rlsd", 2, 2, lam0=1.0, t_warm=4)
            with pytest.MonkeyPatch.context() as mp:
                out["grpo"] = H.run(mp, tmp, "grpo", 2, 2)
            with pytest.MonkeyPatch.context() as mp:
                out["cepo_1rank"] = H.run(mp, tmp, "cepo", 1, 1, lam0=0.5, t_warm=1)
        yield out


def by_row(run, step):
    """{(dataset index, session): record} of the rows verl's actor update trained on at `step` (1-based)."""
    import verl_real_harness as H

    update = next(u for u in run["updates"] if u["step"] == step)
    return {H.key_of(run["writer"], k): r for k, r in update["rows"].items() if not r["is_padding"]}, update


def test_the_project_trainer_ran_verls_stages(runs):
    from verl.trainer.ppo.v1 import PPOTrainerSync

    from cepo_kernels.integrations.verl.trainer import CEPOPPOTrainer

    assert type(runs["cepo"]["trainer"]) is CEPOPPOTrainer and type(runs["grpo"]["trainer"]) is PPOTrainerSync
    for name in ("cepo", "rlsd", "grpo"):
        assert [u["step"] for u in runs[name]["updates"]] == [1, 2]
        for u in runs[name]["updates"]:
            assert sum(r["is_padding"] for r in u["rows"].values()) == 1  # 11 rollouts, padded to 12
            assert "actor/pg_loss" in u["metrics"]
        # KL in the loss: 0 while the policy is the reference (step 1), > 0 after one update (step 2)
        kl = [u["metrics"]["actor/kl_loss"] for u in runs[name]["updates"]]
        assert kl[0] == 0.0 and kl[1] > 0.0, (name, kl)
    assert [s["step"] for s in runs["cepo"]["stages"]] == [0, 1]


def plain_logps(model_dir, dtype, rows):
    """log P(response | context) per token at temperature T for rows of (context ids, response ids): one plain
    forward per row of the initial model in `dtype`."""
    import verl_real_harness as H
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    for ctx, resp in rows:
        seq = torch.tensor(list(ctx) + list(resp))
        with torch.no_grad():
            logits = model(input_ids=seq[None]).logits[0, len(ctx) - 1: len(seq) - 1]
        out.append(cepo_ref.token_logprobs(logits, seq[len(ctx):], temperature=H.T))
    return out


def padded(rows, like):
    out = torch.zeros(like.shape, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_scorer_on_the_rollout_rows_returns_verls_old_log_probs(runs):
    """Step 1 (the initial weights): the adapter's scorer on the rollout rows and verl's old log-probs, each
    within the house bound of a float64 forward; and of each other within the sum of the two bounds, at every
    step."""
    for name in ("cepo", "rlsd", "cepo_1rank"):
        model_dir = runs[name]["trainer"].config.actor_rollout_ref.model.path
        first = runs[name]["stages"][0]
        rows = list(zip(first["prompts"], first["responses"], strict=True))
        ref64 = padded(plain_logps(model_dir, torch.float64, rows), first["mask"])
        ref32 = padded(plain_logps(model_dir, torch.float32, rows), first["mask"])
        err32 = (ref32 - ref64).abs().max().item()
        for stage in runs[name]["stages"]:
            mask = stage["mask"]
            own = stage["own"].masked_fill(~mask, 0)
            old = stage["old_log_probs"].float().masked_fill(~mask, 0)
            if stage is first:
                assert_close(own, ref64, ref32, name=f"scorer ({name})")
                assert_close(old, ref64, ref32, name=f"verl's old log-probs ({name})")
            assert (own - old).abs().max().item() <= 4 * err32 + 2e-6, name


def test_padding_rows_stay_out_of_the_cepo_stage(runs):
    for name in ("cepo", "rlsd"):
        for stage, update in zip(runs[name]["stages"], runs[name]["updates"], strict=True):
            assert len(stage["A"]) == 11  # the real rows only
            # 3 real groups per batch; verl's padding group (all rewards 0, no answer) would be a 4th fallback
            assert stage["metrics"].get("cepo/r_minus_fallbacks", 0.0) <= 3.0
            pads = [r for r in update["rows"].values() if r["is_padding"]]
            assert all(torch.equal(r["advantages"], torch.zeros_like(r["advantages"])) for r in pads)


def reference(stage, model_dir, dtype):
    """A_hat of the stage from cepo_ref: verl's A, and the teachers' log-probs recomputed by plain forwards
    of the initial model in `dtype` on the very teacher rows the adapter's scorer was given."""
    from cepo_kernels.integrations.verl import sequence_advantage

    mask = stage["mask"]
    A = sequence_advantage(stage["A"], mask).to(dtype)
    rows = [i for i in range(len(A)) if A[i] != 0]
    ids, attn, rmask, _ = stage["calls"][0]
    teacher_rows = []
    for j in range(ids.shape[0]):
        seq = ids[j][attn[j].bool()].tolist()
        n = int(rmask[j].sum())
        teacher_rows.append((seq[: len(seq) - n], seq[len(seq) - n:]))
    logps = plain_logps(model_dir, dtype, teacher_rows)
    pos = torch.zeros(mask.shape, dtype=dtype)
    neg = stage["old_log_probs"].to(dtype).clone() if stage["algo"] == "rlsd" else torch.zeros_like(pos)
    for k, i in enumerate(rows):
        pos[i, : len(logps[k])] = logps[k]
        if stage["algo"] == "cepo":
            neg[i, : len(logps[len(rows) + k])] = logps[len(rows) + k]
    lam = stage["metrics"]["cepo/lambda"]
    return cepo_ref.cepo_advantages(A, pos, neg, mask, lam=lam, eps_w=stage["settings"].eps_w), len(rows)


@pytest.mark.parametrize("name", ["cepo", "rlsd", "cepo_1rank"])
def test_a_hat_equals_the_reference_on_float64_teachers(runs, name):
    stage = runs[name]["stages"][0]  # step 1: the initial weights, which the reference loads
    model_dir = runs[name]["trainer"].config.actor_rollout_ref.model.path
    ref64, rows = reference(stage, model_dir, torch.float64)
    ref32, _ = reference(stage, model_dir, torch.float32)
    assert rows == stage["metrics"]["cepo/teacher_rows"] > 0
    assert_close(stage["a_hat"].float(), ref64, ref32, name=f"A_hat ({name})")
    assert not torch.equal(stage["a_hat"], stage["A"])  # the teachers moved it


def test_two_ranks_equal_one(runs):
    """Both runs' step-1 A_hat against the float64 reference, within the house bound; and the same r-, rows
    and metrics count."""
    two, one = runs["cepo"]["stages"][0], runs["cepo_1rank"]["stages"][0]
    w2, w1 = runs["cepo"]["writer"], runs["cepo_1rank"]["writer"]
    assert sorted(w2.uid_index.values())[:3] == sorted(w1.uid_index.values())[:3]
    m2, m1 = two["metrics"], one["metrics"]
    assert m2["cepo/teacher_rows"] == m1["cepo/teacher_rows"] and m2["cepo/lambda"] == m1["cepo/lambda"]
    rows2, _ = by_row(runs["cepo"], 1)
    rows1, _ = by_row(runs["cepo_1rank"], 1)
    assert rows2.keys() == rows1.keys()
    model_dir = runs["cepo"]["trainer"].config.actor_rollout_ref.model.path
    ref64, _ = reference(two, model_dir, torch.float64)
    ref32, _ = reference(two, model_dir, torch.float32)
    err32 = (ref32 - ref64).abs().max().item()
    for key in rows2:
        a2, a1 = rows2[key]["advantages"], rows1[key]["advantages"]
        assert (a2 - a1).abs().max().item() <= 4 * err32 + 1e-6, key  # each within 2 x err32 of float64


def test_lambda_zero_leaves_verls_grpo_advantages_bit_for_bit(runs):
    cepo, _ = by_row(runs["cepo"], 2)  # step 2: lambda = 0.5 * (1 - 1 / 1) = 0
    grpo, _ = by_row(runs["grpo"], 2)
    assert runs["cepo"]["stages"][1]["metrics"] == {"cepo/lambda": 0.0, "cepo/teacher_rows": 0.0}
    assert cepo.keys() == grpo.keys() and len(cepo) == 11
    for key in cepo:
        assert torch.equal(cepo[key]["advantages"], grpo[key]["advantages"]), key
