"""Shared prefixes (rl/prefix.py) against the plain padded path (teacher.pack + model.response_hidden).

On tiny models with real attention (a Qwen3 from its config and the embedded Qwen2), full and LoRA: the
hidden states, the policy's and both teachers' log-probs, the loss and its gradients w.r.t. the parameters
are no further from a float64 run of the same model than torch's own fp32 plain path is. Then a short
Trainer run checks the token accounting and that --no-share-prefix gives the same losses.
"""

import copy
import json

import pytest
import torch
from helpers import assert_close

import cepo_ref
from cepo_kernels import linear_cepo_loss, linear_logprobs, linear_teacher_logprobs
from cepo_kernels.rl.config import TrainConfig
from cepo_kernels.rl.task import build_tiny_model, build_tokenizer
from cepo_kernels.rl.trainer import Trainer
from cepo_kernels.step import lam_at
from cepo_kernels.step.contexts import pack
from cepo_kernels.step.forward import lm_head, prefix_hidden, response_hidden

PAD = 0
LAM = 0.5


def tiny_qwen3(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         max_position_embeddings=64, pad_token_id=PAD, attention_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def make_model(arch, mode):
    model = tiny_qwen3() if arch == "qwen3" else build_tiny_model(build_tokenizer(), seed=0)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: B is random too, so the adapters change the outputs (not an identity)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         init_lora_weights=False)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model = get_peft_model(model, cfg)
    return model.float()


def contexts(seed, vocab, n_groups, lens_of_group):
    """Per group: the prompt, r+ and r- contexts (prompt + answer) and the responses (ids in [1, vocab))."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompt_lens = [3, 7, 5][:n_groups]
    groups = []
    for k, plen in enumerate(prompt_lens):
        prompt = rand(plen)
        groups.append(dict(prompt=prompt, pos=prompt + rand(2), neg=prompt + rand(3 + k),
                           responses=[rand(n) for n in lens_of_group[k]]))
    return groups


def rows_of(groups, ctx):
    """(distinct prefixes, responses, owner, per-row prefixes) of one context kind over all groups."""
    prefixes, responses, owner, per_row = [], [], [], []
    for k, grp in enumerate(groups):
        prefixes.append(grp[ctx])
        for r in grp["responses"]:
            responses.append(r)
            owner.append(k)
            per_row.append(grp[ctx])
    return prefixes, responses, owner, per_row


def plain(model, per_row, responses):
    packed = pack(per_row, responses, PAD)
    return response_hidden(model, packed), packed.targets, packed.mask


def shared(model, prefixes, responses, owner):
    return prefix_hidden(model, prefixes, responses, owner, pad_id=PAD, device="cpu")


def targets_mask(responses, R):
    t = torch.full((len(responses), R), PAD, dtype=torch.long)
    m = torch.zeros((len(responses), R), dtype=torch.bool)
    for i, r in enumerate(responses):
        t[i, : len(r)] = torch.tensor(r[:R], dtype=torch.long)
        m[i, : len(r)] = True
    return t, m


def vocab_of(model):
    return lm_head(model)[0].shape[0]


CASES = {
    # responses of different lengths, one of length 1, in groups with prefixes of different lengths
    "mixed": [[4, 1, 6], [2, 5], [3, 3, 1, 4]],
    # every response of length 1: prefix_hidden returns the prefix's last state only
    "len1": [[1, 1], [1], [1, 1]],
    # an empty response (the trainer never passes one: generate emits >= 1 token), masked out
    "empty": [[0, 3], [2], [4, 0]],
}


@pytest.mark.parametrize("arch, mode, case", [
    ("qwen3", "full", "mixed"), ("qwen3", "lora", "mixed"), ("qwen2", "full", "mixed"),
    ("qwen2", "lora", "mixed"), ("qwen3", "full", "len1"), ("qwen3", "lora", "empty"),
])
def test_shared_prefix_hidden_and_logprobs_match_plain(arch, mode, case):
    model = make_model(arch, mode).eval()
    model64 = copy.deepcopy(model).double()
    groups = contexts(3, vocab_of(model), 3, CASES[case])
    weight, bias = lm_head(model)
    weight64, bias64 = lm_head(model64)
    logp = {}
    with torch.no_grad():
        for ctx in ("prompt", "pos", "neg"):
            prefixes, responses, owner, per_row = rows_of(groups, ctx)
            h_plain, targets, mask = plain(model, per_row, responses)
            h64, _, _ = plain(model64, per_row, responses)
            h_shared = shared(model, prefixes, responses, owner)
            R = targets.shape[1]
            assert h_shared.shape == h_plain.shape == (len(responses), R, h_plain.shape[-1])
            m = mask[..., None].expand_as(h_plain)
            assert_close(h_shared[m], h64[m], h_plain[m], atol=1e-6, name=f"{ctx} hidden")
            logp[ctx] = dict(
                shared=linear_logprobs(h_shared, weight, targets, bias=bias),
                plain32=cepo_ref.linear_logprobs(h_plain, weight, targets, bias=bias),
                ref64=cepo_ref.linear_logprobs(h64, weight64, targets, bias=bias64),
                hidden=h_shared, mask=mask, targets=targets,
            )
        pos, neg = linear_teacher_logprobs(logp["pos"]["hidden"], logp["neg"]["hidden"], weight,
                                           logp["pos"]["targets"], bias=bias)
    logp["pos"]["shared"], logp["neg"]["shared"] = pos, neg
    for ctx, d in logp.items():
        m = d["mask"]
        assert_close(d["shared"][m], d["ref64"][m], d["plain32"][m], atol=1e-6, name=f"{ctx} logp")


def step_loss(model, groups, path, loss_fn, old, pos, neg, adv):
    """The policy's loss on the rows of all groups, its hidden states from the shared or the plain path."""
    prefixes, responses, owner, per_row = rows_of(groups, "prompt")
    if path == "shared":
        h = shared(model, prefixes, responses, owner)
    else:
        h, _, _ = plain(model, per_row, responses)
    targets, mask = targets_mask(responses, h.shape[1])
    weight, bias = lm_head(model)
    return loss_fn(h, weight, targets, adv, mask, old_logp=old, pos_logp=pos, neg_logp=neg, bias=bias,
                   lam=LAM)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_shared_prefix_loss_and_gradients_match_plain(arch, mode):
    """With gradients on, the gradient flows through each shared prompt once and equals the plain path's."""
    model = make_model(arch, mode).train()
    model64 = copy.deepcopy(model).double()
    groups = contexts(5, vocab_of(model), 2, [[3, 1, 5], [4, 2]])
    B = sum(len(g["responses"]) for g in groups)
    R = max(len(r) for g in groups for r in g["responses"])
    gen = torch.Generator().manual_seed(7)
    adv = torch.tensor([1.0, -0.5, 0.3, 0.0, -1.2])[:B]
    old = -4.5 + 0.1 * torch.randn(B, R, generator=gen, dtype=torch.float64)
    pos = old + 0.3 * torch.randn(B, R, generator=gen, dtype=torch.float64)
    neg = old + 0.3 * torch.randn(B, R, generator=gen, dtype=torch.float64)
    model32 = copy.deepcopy(model)
    results = {}
    for name, m, path, fn, dt in (("shared", model, "shared", linear_cepo_loss, torch.float32),
                                  ("plain32", model32, "plain", cepo_ref.linear_cepo_loss, torch.float32),
                                  ("ref64", model64, "plain", cepo_ref.linear_cepo_loss, torch.float64)):
        out = step_loss(m, groups, path, fn, old.to(dt), pos.to(dt), neg.to(dt), adv.to(dt))
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        results[name] = (out.loss.detach(), grads)
    assert_close(results["shared"][0], results["ref64"][0], results["plain32"][0], atol=1e-7, name="loss")
    grads = results["shared"][1]
    assert grads and all(g.abs().max() > 0 for g in grads.values() if g.numel() > 1)
    for n, g in grads.items():
        assert_close(g, results["ref64"][1][n], results["plain32"][1][n], atol=1e-7, name=f"grad {n}")


RUN = dict(steps=3, t_warm=1, prompts_per_step=2, group_size=4, max_new_tokens=5, micro_batch_size=8,
           mini_batch_prompts=2, sft_steps=3, sft_batch_size=8, eval_every=0, progress=False, save_every=0,
           lr=1e-12)


def run_metrics(tmp_path, name, **kw):
    # a reward that varies within a group on an untrained model, so advantages (and teacher rows) are non-zero
    tr = Trainer(TrainConfig(**{**RUN, "out_dir": str(tmp_path / name), **kw}),
                 reward_fn=lambda text, ref: float(len(text) % 3) / 2)
    tr.train()
    tr.close()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_trainer_accounting_and_no_share_prefix_equivalence(tmp_path):
    """lambda reaches 0 after t_warm = 1 of 3 steps. lr = 1e-12: an AdamW step moves a weight by about lr,
    below the ulp of all but the tiniest fp32 weights, so both runs see the same model and the same rollouts
    at every step, and any difference in their losses comes from the shared path's arithmetic alone."""
    a = run_metrics(tmp_path, "shared")
    b = run_metrics(tmp_path, "plain", share_prefix=False)
    lams = [lam_at(s, 0.5, 1) for s in range(3)]
    assert [r["lambda"] for r in a] == pytest.approx(lams) and lams == [0.5, 0.0, 0.0]
    naive = sum(r["teacher_tokens_naive"] for r in a)
    assert naive > 0
    assert sum(r["teacher_tokens"] for r in a) <= 0.6 * naive
    for ra, rb in zip(a, b, strict=True):
        if ra["lambda"] == 0.0:
            assert ra["teacher_tokens"] == 0 and ra["teacher_rows"] == 0
        else:
            assert rb["teacher_tokens"] == rb["teacher_tokens_naive"] == ra["teacher_tokens_naive"]
        assert ra["policy_tokens"] < ra["policy_tokens_naive"] == rb["policy_tokens"]
        assert ra["reward_mean"] == rb["reward_mean"]  # the same rollouts
        # Both losses are token means of O(1) terms built from the same fp32 kernels; the hidden states
        # differ only in the order of fp32 sums over <= 30 keys and 64 features (the tests above bound that
        # difference by torch's own error). Relative bound: 2 layers x 64 terms x 2^-24 ~ 1e-5.
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["delta_mean"] == pytest.approx(rb["delta_mean"], rel=1e-4, abs=1e-5)
