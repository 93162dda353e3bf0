"""Optional adapters to other training libraries, imported only when used.

`cepo_kernels.integrations.trl`: `CEPOConfig` / `CEPOTrainer`, CEPO as a drop-in for TRL's `GRPOTrainer`
(needs the `trl` extra: `pip install "cepo_kernels[trl]"`).
"""
