"""Build script. Metadata and packages live in pyproject.toml; this file adds the optional CUDA extension."""

from setuptools import setup

setup()
