"""Triton kernels, one file per input form: logits.py (policy/teacher logits), linear.py (hidden states + lm_head)."""
