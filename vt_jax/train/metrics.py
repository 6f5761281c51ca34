"""Where training metrics go: a console progress line, a JSONL file, TensorBoard, optionally W&B.

Only process 0 writes. Every sink receives the same flat `{name: float}` dict per logged step; the JSONL
file (`<workdir>/metrics.jsonl`, one object per line with "step") is the record tests and tools read.
On resume the JSONL file is cut back to the restored step, so an interrupted-and-resumed run leaves the
same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics file (skips a torn last line from a killed process)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


class MetricsWriter:
  """Fans metrics out to the enabled sinks. `write(step, metrics)`; `close()` at the end."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               wandb: Mapping[str, Any] | None = None, resume_step: int = 0, config: Any = None):
    self.enabled = enabled
    self._tb = self._wandb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    _truncate_after(path, resume_step)
    self._jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step drops events a killed run wrote after the checkpoint we resume from.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)
    if wandb and wandb.get("enabled"):
      import wandb as wandb_lib  # pylint: disable=g-import-not-at-top  # optional dependency
      self._wandb = wandb_lib.init(project=wandb.get("project") or "vt_jax", name=wandb.get("name") or None,
                                   dir=workdir, resume="allow", id=wandb.get("run_id") or None,
                                   config=config)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float | int) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(clean, step=step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _plain(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if isinstance(v, int) else f


def _truncate_after(path: str, step: int) -> None:
  """Keeps only records with step <= `step` (all of them when step is 0 and the file is new)."""
  if not os.path.exists(path):
    return
  keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
  with open(path + ".tmp", "w") as f:
    for r in keep:
      f.write(json.dumps(r) + "\n")
  os.replace(path + ".tmp", path)


class ProgressBar:
  """One console line: step/total, loss, lr, tokens/s, ETA. A live bar on a terminal, a log line per
  update otherwise (CI logs, subprocess pipes)."""

  def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self._start_step, self._t0 = start_step, time.perf_counter()
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    done = step - self._start_step
    elapsed = time.perf_counter() - self._t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    fields = {"loss": f"{metrics.get('loss', float('nan')):.4f}",
              "lr": f"{metrics.get('lr', float('nan')):.2e}",
              "tok/s": f"{metrics.get('tokens_per_s', float('nan')):.0f}",
              "eta": _fmt_seconds(eta)}
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(fields, refresh=True)
    else:
      text = " ".join(f"{k} {v}" for k, v in fields.items())
      print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
