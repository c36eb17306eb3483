"""Packaging for megatron-tasp.

torch is deliberately a *range* (>=2.4): install torch first (``pip install torch==2.13.0`` on CPU)
so that pip never resolves a multi-GB CUDA build on a machine that does not need one.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-tasp",
    version="0.1.0",
    description="TASP: topology-aware multi-ring context parallelism for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tasp", "megatron_tasp.*"]) + ["megatron_tasp.configs"],
    package_dir={"megatron_tasp.configs": "configs"},
    package_data={"megatron_tasp.configs": ["topologies/*.yaml", "recipes/*.yaml"]},
    install_requires=["pyyaml>=5.4"],
    extras_require={
        "torch": ["torch>=2.4", "numpy"],
        "megatron": ["megatron-core>=0.16", "torch>=2.4", "numpy", "packaging>=24.2", "psutil"],
        "plot": ["matplotlib>=3.5"],
        "progress": ["tqdm>=4.60"],
        "test": ["pytest>=7", "hypothesis>=6.80", "ruff>=0.5", "matplotlib>=3.5", "tqdm>=4.60", "psutil"],
    },
    entry_points={"console_scripts": ["megatron-tasp=megatron_tasp.cli:main"]},
    license="Apache-2.0",
)
