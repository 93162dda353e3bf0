"""The thin RLVR training loop around the fused kernels: teacher contexts, rollouts, trainer, CLI."""
