"""Triton kernels, one file per input form.

logits.py: policy/teacher logits; linear.py (+ linear_bwd.py): hidden states and the lm_head weight.
"""
