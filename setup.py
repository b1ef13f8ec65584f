"""Packaging for kogpt-fast.

`kernels/` (Triton kernels) installs as `kogpt_fast.kernels`: a top-level package named `kernels`
would clash with an existing PyPI package. The embedded demo checkpoint ships as package data.
"""
from setuptools import setup

setup(
    packages=["kogpt_fast", "kogpt_fast.demo", "kogpt_fast.kernels"],
    package_dir={"kogpt_fast": "kogpt_fast", "kogpt_fast.kernels": "kernels"},
    package_data={"kogpt_fast.demo": ["*.json", "*.safetensors", "*.model", "*.md"]},
)
