"""Grain worker processes import the data pipeline; it must not pull in flax or the model."""

import subprocess
import sys


def test_data_pipeline_imports_without_flax():
  code = ("import sys, vt_jax.data.loader, vt_jax.data.packing, vt_jax.data.sequences; "
          "print(sorted(m for m in ('flax', 'optax', 'vt_jax.model.modeling') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_model_names_still_import():
  code = "from vt_jax.model import Qwen25VL, attention; print(callable(attention), Qwen25VL.__name__)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.split() == ["True", "Qwen25VL"], out.stdout + out.stderr[-2000:]
