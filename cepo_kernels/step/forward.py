"""The model forwards of a step: last hidden states that predict the responses, and the lm_head.

The loss and log-prob kernels take hidden states and the lm_head weight, so no forward here runs the
head. Models are duck-typed Hugging Face causal LMs (`get_decoder()`, `get_output_embeddings()`; a
peft wrapper is looked through); transformers is imported only for the shared-prefix cache.

Shared prefixes: run a context common to several responses once and reuse its key/value cache.

Within a group, the policy contexts share the prompt, the positive teacher's share prompt + r+, and the
negative teacher's share prompt + r-. `prefix_hidden` runs each distinct prefix once (left-padded, as
`contexts.pack` lays it out), repeats its cache for the rows that continue it, and runs only the response
tokens on top, with the same position ids as the plain path (counted over the non-pad tokens). With
gradients enabled the gradient flows through each shared prefix once.

The hidden state that predicts response token t is the prefix's last state for t = 0 and the response
pass's state t - 1 after that, so a response's last token is never run (nothing follows it).
"""

from __future__ import annotations

import inspect

import torch

from cepo_kernels.step.contexts import pack, response_targets, to_device

__all__ = ["base_model", "lm_head", "response_hidden", "SharedPrefixUnsupported", "prefix_hidden",
           "context_hidden"]


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output projection."""
    head = base_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def response_hidden(model, packed, rows=None) -> torch.Tensor:
    """Last hidden states [b, R, H] at the positions that predict the response tokens of a `pack`ed batch.

    Runs the decoder only (no lm_head, so no [b, T, V] logits); column start - 1 + t predicts token t.
    """
    ids, attn, pos = packed.input_ids, packed.attention_mask, packed.position_ids
    if rows is not None:
        ids, attn, pos = ids[rows], attn[rows], pos[rows]
    decoder = base_model(model).get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    R = packed.targets.shape[1]
    return hidden[:, packed.start - 1 : packed.start - 1 + R]  # [b, R, H]


class SharedPrefixUnsupported(RuntimeError):
    """The model's key/value cache cannot be reused this way (the caller falls back to the plain path)."""


def prefix_hidden(model, prefixes: list[list[int]], responses: list[list[int]], owner: list[int], *,
                  pad_id: int, device) -> torch.Tensor:
    """Last hidden states [n, R, H] at the positions that predict each response's tokens.

    prefixes: the distinct prefixes (token ids, each non-empty); responses: n token-id lists; owner[i]: the
    index of response i's prefix. R = the longest response (>= 1); columns past a response's length hold
    unspecified values (masked by the caller).
    """
    if len(owner) != len(responses):
        raise ValueError(f"owner: expected one prefix index per response ({len(responses)}), "
                         f"got {len(owner)}")
    base = base_model(model)
    decoder = base.get_decoder()
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=base.config)
    except (ImportError, TypeError) as e:
        raise SharedPrefixUnsupported(f"no DynamicCache for this model ({e})") from None
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", [])):
        raise SharedPrefixUnsupported("sliding-window attention layers")
    packed = pack(prefixes, [[] for _ in prefixes], pad_id, device, resp_len=0)  # left-padded prefixes only
    ids, attn, pos = packed.input_ids, packed.attention_mask, packed.position_ids
    plen = attn.sum(dim=1)
    # transformers >= 5.x names the argument `cache`, earlier releases `past_key_values`
    arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    out = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{arg: cache})
    rows = to_device(torch.tensor(owner, dtype=torch.long), device)
    first = out.last_hidden_state[:, -1][rows]  # [n, H]: the state that predicts response token 0
    R = max([len(r) for r in responses] + [1])
    if R == 1:
        return first[:, None]
    if not hasattr(cache, "reorder_cache"):
        raise SharedPrefixUnsupported(f"{type(cache).__name__} cannot be repeated per response")
    cache.reorder_cache(rows)  # [g, ...] -> [n, ...]: each response's copy of its prefix's cache
    rids, rmask = response_targets(responses, R - 1, pad_id, device)  # the response tokens run on top
    rattn = rmask.long()
    full_attn = torch.cat([attn[rows], rattn], dim=1)
    rpos = plen[rows, None] + torch.arange(R - 1, device=device)[None]
    out = decoder(input_ids=rids, attention_mask=full_attn, position_ids=rpos, use_cache=True, **{arg: cache})
    return torch.cat([first[:, None], out.last_hidden_state], dim=1)  # [n, R, H]


def context_hidden(model, contexts: list[list[int]], responses: list[list[int]], *, pad_id: int, device,
                   share: bool) -> tuple[torch.Tensor, int, int]:
    """(hidden [n, R, H] predicting each response after its context, R = the longest response; tokens run;
    tokens the plain per-response path runs). With share, each distinct context runs once (prefix_hidden;
    raises SharedPrefixUnsupported for a model whose cache cannot be reused); else every row in full."""
    naive = sum(len(c) + len(r) for c, r in zip(contexts, responses, strict=True))
    if share:
        keys = [tuple(c) for c in contexts]
        distinct = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        prefixes = [list(k) for k in distinct]
        owner = [distinct[k] for k in keys]
        h = prefix_hidden(model, prefixes, responses, owner, pad_id=pad_id, device=device)
        return h, sum(map(len, prefixes)) + sum(map(len, responses)), naive
    return response_hidden(model, pack(contexts, responses, pad_id, device)), naive, naive
