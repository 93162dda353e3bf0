from setuptools import find_packages, setup

setup(
    name="cepo_kernels",
    version="0.1.0",
    description="Fused Triton kernels and a training loop for CEPO (contrastive evidence RLVR)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cepo_kernels", "cepo_kernels.*", "cepo_ref", "cepo_ref.*"]),
    package_data={"cepo_kernels.ops": ["configs.json"]},  # the per-GPU config table, when tuned
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "train": ["transformers>=4.45", "peft>=0.12", "tqdm", "matplotlib"],
        "trl": ["trl"],
    },
    entry_points={"console_scripts": ["cepo-train=cepo_kernels.rl.cli:main"]},
)
