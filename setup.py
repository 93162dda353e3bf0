from setuptools import find_packages, setup

# Ranges: the releases the test suite has run with (.ci/constraints.txt pins the exact set CI uses); widen a
# range only after the suite passed at its new end. pillow: the vision-language images (rl/vision_task.py).
TRAIN = ["transformers>=5.24,<5.26", "peft>=0.22,<0.23", "tqdm", "matplotlib", "pyyaml", "pillow"]
TRL = ["trl>=1.16,<1.17", "datasets>=5.2,<6", "accelerate>=1.16,<1.17"]
# verl 0.9.x and the transformers it accepts (verl 0.9.1: >=5.5.3, !=5.6.0, <5.11; CI: 5.10.4), in an
# environment of its own (the [train] range is newer); its GPU stack (vLLM / SGLang, flash-attn, Megatron) is
# the user's own install
VERL = ["verl>=0.9,<0.10", "transformers>=5.5.3,!=5.6.0,<5.11"]
# graders (cepo_kernels/step/graders.py): the authors' mathruler (it imports pylatexenc without declaring
# it), Hugging Face's math-verify
OFFICIAL = ["mathruler>=0.1", "pylatexenc>=2.10"]
MATH_VERIFY = ["math-verify>=0.9"]

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
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "train": TRAIN,
        "trl": TRL,
        "verl": VERL,
        "official": OFFICIAL,
        "math-verify": MATH_VERIFY,
        # the whole test suite: the training-loop, TRL and grader tests need those extras too
        "test": ["pytest>=9,<10", "pytest-benchmark>=5,<6", *TRAIN, *TRL, *OFFICIAL, *MATH_VERIFY],
    },
    entry_points={
        "console_scripts": [
            "cepo-train=cepo_kernels.rl.cli:main",
            "cepo-viz=cepo_kernels.analysis.viz:main",
            "cepo-compare=cepo_kernels.analysis.compare:main",
        ]
    },
)
