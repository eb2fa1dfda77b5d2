"""megatron-stag: StagFormer and AltUp for megatron-core 0.19."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-stag",
    version="0.1.0",
    description="StagFormer (staggered transformer) and AltUp models as a megatron-core 0.19 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_stag", "megatron_stag.*"]),
    # recipes and batch scripts travel with a wheel (found by megatron_stag/platform/shipped.py)
    data_files=[(f"share/megatron-stag/{folder}", sorted(str(p) for p in Path(folder).iterdir() if p.is_file()))
                for folder in ("recipes", "slurm")],
    install_requires=[
        "torch>=2.11,<2.15",
        "megatron-core>=0.19,<0.20",
        "numpy",
        "sentencepiece",
        "protobuf",  # reads a sentencepiece model's settings (export --format hf writes its tokenizer.json)
        "safetensors",
        "pyyaml",
        "psutil",  # hidden dependency of megatron's torch_dist checkpoint saving
        "matplotlib",  # megatron-stag plot
        "tensorboard",  # megatron's --tensorboard-dir (logging.tensorboard_dir) writes through it
    ],
    extras_require={
        # AutoTP (tensor-parallel DeepSpeed inference) imports transformers
        "deepspeed": ["deepspeed>=0.19,<0.20", "transformers>=5,<6"],
        "eval": ["lm-eval>=0.4.9,<0.5", "accelerate", "transformers>=5,<6"],  # megatron-stag eval (HFLM)
        "test": ["pytest", "pytest-timeout", "ruff"],
    },
    entry_points={"console_scripts": ["megatron-stag=megatron_stag.cli:main"]},
)
