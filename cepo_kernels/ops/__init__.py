"""The kernels, one family per input form, each cut into the same files.

For a family X (logits: policy/teacher logits; linear: hidden states and the lm_head weight, logits never
stored; divergence: the self-distillation divergences, whose native CPU kernels are ops/_divergence_torch.py):
ops/_X_kernels.py the @triton.jit kernels; ops/_X_launch.py their launchers (tensors in and out, no
autograd); ops/_X_ops.py the launchers as PyTorch operators (torch.ops.cepo_kernels.*: real implementation,
fake implementation, autograd, and the native CPU kernel of each, from ops/_X_cpu.py); ops/X.py the public
functions (docstrings, input checks). _common.py: what the families share (the per-token CEPO arithmetic in
Triton and, ops/_cpu.py, in PyTorch; the buffers; the reduced loss and metrics; `cpu_backend`, the switch
between the native CPU kernels and Triton's interpreter); advantages.py: group_advantages; configs.py: the
logits kernels' launch configs (defaults, per-GPU table).
"""
