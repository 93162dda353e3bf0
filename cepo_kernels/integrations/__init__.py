"""Optional adapters to other training libraries, imported only when used.

`cepo_kernels.integrations.trl`: `CEPOConfig` / `CEPOTrainer`, CEPO as a drop-in for TRL's `GRPOTrainer`
(needs the `trl` extra: `pip install "cepo_kernels[trl]"`).

`cepo_kernels.integrations.verl`: `algorithm.adv_estimator=cepo` / `rlsd` for verl 0.9.x, with the CEPO
trainer in `cepo_kernels.integrations.verl.trainer` (needs the `verl` extra:
`pip install "cepo_kernels[verl]"`).
"""
