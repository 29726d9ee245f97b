"""Package build. Metadata lives in pyproject.toml; this file adds the compiled extension."""
from setuptools import setup

setup()
