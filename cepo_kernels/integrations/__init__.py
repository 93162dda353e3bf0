"""Optional adapters to other training libraries, imported only when used.

`cepo_kernels.integrations.trl`: `CEPOConfig` / `CEPOTrainer`, CEPO as a drop-in for TRL's `GRPOTrainer`
(needs the `trl` extra: `pip install -e ".[trl]"` in a clone).

`cepo_kernels.integrations.verl`: `algorithm.adv_estimator=cepo` / `rlsd` for verl 0.9.x, with the CEPO
trainer in `cepo_kernels.integrations.verl.trainer` (needs the `verl` extra:
`pip install -e ".[verl]"` in a clone).
"""
