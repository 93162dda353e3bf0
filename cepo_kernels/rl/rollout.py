"""Rollouts: sampling (or greedy decoding of) responses with Hugging Face `generate`.

On a GPU the prompts go through `generate` in chunks sized by the free memory (`generation_chunk`), and the
allocator's cache is emptied afterwards, so the key/value caches of generation do not stay reserved
during the update that follows. On a CPU the chunks are `chunk` prompts, as asked.
"""

from __future__ import annotations

import torch

MEMORY_FRACTION = 0.8  # of the free memory a chunk may plan to use (the rest: fragmentation, workspaces)


def sequence_bytes(config, seq_len: int, dtype_bytes: int) -> int | None:
    """Bytes one sequence of seq_len tokens needs while generating (None when the config lacks the sizes):
    its key/value cache over every layer, the prefill's widest activation (the MLP's [seq_len, intermediate]
    x 3: gate, up and their product) and the last position's logits in fp32 with the sampler's copies (x 4).
    docs/recipe-4b.md works it through for Qwen3-4B."""
    try:
        layers, hidden, heads, vocab = (config.num_hidden_layers, config.hidden_size,
                                        config.num_attention_heads, config.vocab_size)
    except AttributeError:
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * layers * kv_heads * head_dim * seq_len * dtype_bytes
    prefill = 3 * seq_len * (getattr(config, "intermediate_size", None) or 4 * hidden) * dtype_bytes
    return kv + prefill + 4 * 4 * vocab


def generation_chunk(requested: int, free_bytes: int | None, config=None, seq_len: int = 0,
                     dtype_bytes: int = 2) -> int:
    """How many prompts to generate at once: `requested`, lowered on a GPU (free_bytes given) to what
    MEMORY_FRACTION of free_bytes holds at sequence_bytes(config, seq_len) each; at least 1."""
    if requested < 1:
        raise ValueError(f"chunk: expected at least 1 prompt per chunk, got {requested}")
    if free_bytes is None or config is None:
        return requested
    per_seq = sequence_bytes(config, seq_len, dtype_bytes)
    if per_seq is None:
        return requested
    return max(1, min(requested, int(MEMORY_FRACTION * free_bytes) // per_seq))


def free_memory(device) -> int | None:
    """Bytes a new allocation can use on a CUDA device (free on the card + what the caching allocator holds
    unused); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cut_at_eos(rows: list[list[int]], eos_ids: set[int]) -> list[list[int]]:
    """Each generated row up to and including its first eos token (all of it when it has none)."""
    out = []
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        out.append(row[: ends[0] + 1] if ends else row)
    return out


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
    Prompts are left-padded in chunks of at most `chunk` sequences; on a GPU a chunk is cut further to what
    the free memory holds (generation_chunk), and the cache is freed after generation.
    """
    was_training = model.training
    model.eval()
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out: list[list[int]] = []
    config = getattr(model, "config", None)
    dtype_bytes = next(model.parameters()).element_size()
    lo = 0
    try:
        while lo < len(prompt_ids):
            part = prompt_ids[lo : lo + chunk]
            n = generation_chunk(len(part), free_memory(device), config,
                                 max(len(p) for p in part) + max_new_tokens, dtype_bytes)
            part = part[:n]
            lo += n
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
            out += cut_at_eos(seqs[:, L:].tolist(), eos_ids)
    finally:
        model.train(was_training)
        if free_memory(device) is not None:
            torch.cuda.empty_cache()  # the generation's caches, before the update allocates its own
    return out
