"""Triton kernels, one family per input form.

logits.py: launchers and public functions on policy/teacher logits, _logits_ops.py the launchers as PyTorch
operators (torch.ops.cepo_kernels.*; the linear ones live in linear.py and linear_bwd.py),
_logits_kernels.py their kernels, _logits_tiles.py the kernels' vocabulary scan and gradient pieces;
linear.py (+ linear_bwd.py): hidden states and the lm_head weight, _linear_kernels.py the forward kernels;
_common.py: what both share (the per-token CEPO arithmetic, the buffers, the reduced loss and metrics);
advantages.py: group_advantages; configs.py: the logits kernels' launch configs (defaults, per-GPU table).
"""
