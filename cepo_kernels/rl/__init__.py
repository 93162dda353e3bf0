"""The thin RLVR training loop around the fused kernels (advantages, teacher contexts, rollouts, trainer, CLI)."""
