"""Rollout chunking by free memory (rl/rollout.generation_chunk); generation itself runs in test_rl_train."""

import types

import pytest
import torch

from cepo_kernels.rl.rollout import MEMORY_FRACTION, free_memory, generation_chunk, sequence_bytes

QWEN3_4B = types.SimpleNamespace(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                 num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                 head_dim=128)


def test_sequence_bytes_of_qwen3_4b():
    # bf16, 768 prompt + 2048 new tokens: K and V of 36 layers x 8 heads x 128 dims per token ...
    T = 768 + 2048
    kv = 2 * 36 * 8 * 128 * 2 * T  # 147,456 bytes a token
    assert sequence_bytes(QWEN3_4B, T, 2) == kv + 3 * T * 9728 * 2 + 16 * 151936
    assert sequence_bytes(types.SimpleNamespace(hidden_size=8), 10, 2) is None  # not a decoder config


def test_generation_chunk_follows_free_memory():
    T, per_seq = 2816, sequence_bytes(QWEN3_4B, 2816, 2)
    assert generation_chunk(64, None, QWEN3_4B, T) == 64  # CPU: as asked
    assert generation_chunk(64, 10**15, QWEN3_4B, T) == 64  # plenty: never more than asked
    free = 40 * 2**30
    assert generation_chunk(64, free, QWEN3_4B, T) == int(MEMORY_FRACTION * free) // per_seq < 64
    assert generation_chunk(64, 10**6, QWEN3_4B, T) == 1  # one sequence at a time, at least
    sizes = [generation_chunk(128, f * 2**30, QWEN3_4B, T) for f in (1, 4, 16, 64)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert generation_chunk(8, 2**30, types.SimpleNamespace(), T) == 8  # sizes unknown: as asked
    with pytest.raises(ValueError, match="chunk"):
        generation_chunk(0, None)


def test_free_memory_is_none_on_cpu():
    assert free_memory("cpu") is None
    if torch.cuda.is_available():
        assert free_memory("cuda") > 0
