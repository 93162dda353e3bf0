"""Rollouts: sampling (or greedy decoding of) responses with Hugging Face `generate`."""

from __future__ import annotations

import torch


class NonFiniteModelError(RuntimeError):
    """The model's next-token distribution holds inf/NaN (its weights diverged)."""


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_id: int | list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    chunk: int = 64,
    device="cpu",
) -> list[list[int]]:
    """Response token ids of each prompt (one response per entry; repeat a prompt for a group).

    Each response ends at its first eos token (kept, so the policy learns to stop) or at max_new_tokens.
    Prompts are left-padded in chunks of `chunk` sequences.
    """
    was_training = model.training
    model.eval()
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out: list[list[int]] = []
    try:
        for lo in range(0, len(prompt_ids), chunk):
            part = prompt_ids[lo : lo + chunk]
            L = max(len(p) for p in part)
            ids = torch.full((len(part), L), pad_id, dtype=torch.long)
            attn = torch.zeros((len(part), L), dtype=torch.long)
            for i, p in enumerate(part):
                ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
                attn[i, L - len(p) :] = 1
            kwargs = (
                {"do_sample": False}
                if greedy
                else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            )
            try:
                seqs = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attn.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos_ids),
                    **kwargs,
                )
            except RuntimeError as e:  # torch.multinomial: "probability tensor contains either inf, nan..."
                if "inf" in str(e) or "nan" in str(e):
                    raise NonFiniteModelError(
                        "the model's next-token probabilities are not finite (inf/NaN)"
                    ) from e
                raise
            for row in seqs[:, L:].tolist():
                resp = []
                for t in row:
                    resp.append(t)
                    if t in eos_ids:
                        break
                out.append(resp)
    finally:
        model.train(was_training)
    return out
