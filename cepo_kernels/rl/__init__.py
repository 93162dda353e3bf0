"""cepo-train: the training loop (trainer, run loop, rollouts, checkpoints, run directories, options, CLI)
that calls the step phases of cepo_kernels.step in order. See docs/architecture.md."""
