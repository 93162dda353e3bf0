"""Triton kernels, one file per input form.

logits.py: policy/teacher logits; linear.py (+ linear_bwd.py): hidden states and the lm_head weight;
_logits_tiles.py: the logits kernels' vocabulary scan and gradient pieces; advantages.py: group_advantages;
configs.py: the logits kernels' launch configs (defaults, per-GPU table).
"""
