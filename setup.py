"""vt_jax: Video-Thinker (arXiv 2510.23473) in JAX/Flax NNX."""
import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def _reqs(name):
  lines = (here / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="vt_jax",
    version="0.1.0",
    description="Video-Thinker: Qwen2.5-VL that thinks with videos, SFT + GRPO in JAX/Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(include=["vt_jax", "vt_jax.*"]) + ["vt_jax.configs"],
    package_dir={"vt_jax.configs": "configs"},
    package_data={"vt_jax.kernels": ["*.cc", "*.h"]},  # built on first use (vt_jax/kernels/cpu.py)
    install_requires=_reqs("requirements.txt"),
    extras_require={
        "test": _reqs("requirements-test.txt"),
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
