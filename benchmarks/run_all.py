"""All side-by-side benchmarks in one run: vt_jax vs transformers / qwen-vl-utils on this machine, as ratios
against the issue's targets, plus the TPU dry-run table. JSON + Markdown into benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py            # ~1 h on 2 shared cores (more under load)
    .venv/bin/python benchmarks/run_all.py --quick    # ~15 min: smaller inputs, fewer repeats
    .venv/bin/python benchmarks/run_all.py --only sft,rollout --threads 2
    .venv/bin/python benchmarks/run_all.py --only dry_run --reuse   # the other parts from results/

Parts (each a script here, run as its own process with the same --threads so torch and XLA get the same
cores; each also runs alone):
  1. sft       bench_sft_vs_torch.py  SFT train step tokens/s vs transformers eager     target >= 2x
  2. rollout   bench_rollout.py       sampled generation tokens/s vs generate           target >= 5x
  3. input     bench_input.py         load_video samples/s vs the qwen-vl-utils path    target >= 2x
  4. mfu       (from 1)               train-step MFU vs the matmul peak of the same run target >= 35%
  5. scaling   bench_scaling.py       step time vs frames / sequence length; vision tower blockwise vs dense
     decode    bench_decode.py        a decode step's parts vs the memory-bandwidth floor (where rollout time goes)
     kernels   bench_kernels.py       the CPU decode kernels vs the XLA ops they replace, one op at a time
     attention bench_attention.py     causal self-attention fwd + bwd vs torch sdpa (where long-row step time goes)
  6. dry_run   `python -m vt_jax.train --config={sft,grpo} --dry_run --topology={v5p-64,v5e-256}` (7B,
               splash attention, batch overrides that split over the chips; scans costed unrolled for
               SFT and scaled for GRPO (--dry_run_loop_cost); ~3-10 min per run on 2 cores; --quick: SFT
               on v5p-64 only), when the CLI has the flag; otherwise the section says it is missing.
Writes results/run_all.{json,md} (the summary) next to each part's own results, and logs/ with each
part's output. The load average is recorded before and after every part: on a shared machine, compare
ratios (measured in interleaved rounds), not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

PARTS = {
    "sft": "bench_sft_vs_torch.py",
    "rollout": "bench_rollout.py",
    "input": "bench_input.py",
    "scaling": "bench_scaling.py",
    "decode": "bench_decode.py",
    "kernels": "bench_kernels.py",
    "attention": "bench_attention.py",
}
RESULT_NAMES = {"sft": "bench_sft_vs_torch", "rollout": "bench_rollout", "input": "bench_input",
                "scaling": "bench_scaling", "decode": "bench_decode", "kernels": "bench_kernels",
                "attention": "bench_attention"}
# (config, topology, overrides): the batch must split over the chips (every chip an equal share of every
# microbatch), so each slice gets the row counts the README's dry-run section uses.
DRY_RUNS = [
    ("sft", "v5p-64", ["--config.train.global_batch=32", "--config.train.microbatches=1"]),
    ("grpo", "v5p-64", ["--config.train.microbatches=2"]),  # 64 completion rows: 2 x 32 chips
    ("sft", "v5e-256", ["--config.train.global_batch=256", "--config.train.microbatches=1",
                        "--config.model.remat=full"]),  # 16 GB chips: remat, one row per chip
    ("grpo", "v5e-256", ["--config.grpo.prompts_per_step=32", "--config.train.microbatches=1",
                         "--config.model.remat=full"]),  # 256 completion rows, one per chip
]
TARGETS = {"sft": 2.0, "rollout": 5.0, "input": 2.0, "mfu": 0.35}


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def reuse_part(name: str, args) -> dict | None:
  """A part's entry from its results files of an earlier run (None when it has none)."""
  result = os.path.join(args.out, RESULT_NAMES[name] + ".json")
  if not os.path.exists(result):
    return None
  # The results carry no date, and a file's mtime in a fresh clone is the checkout time: git log says when.
  with open(result) as f:
    info = {"returncode": 0, "result": json.load(f), "reused": os.path.relpath(result, ROOT)}
  with open(os.path.join(args.out, RESULT_NAMES[name] + ".md")) as f:
    info["markdown"] = f.read()
  info["command"] = info["result"].get("command", "")
  return info


def reuse_dry_runs(args, previous: dict | None) -> dict | None:
  """The dry-run entry of the previous run_all.json in --out (None when it had none), marked as reused."""
  dry = (previous or {}).get("dry_run")
  if not dry:
    return None
  return {**dry, "reused": os.path.relpath(os.path.join(args.out, "run_all.json"), ROOT),
          "reused_command": dry.get("reused_command") or previous.get("command", "")}


def run_part(name: str, args, log_dir: str) -> dict:
  cmd = [sys.executable, os.path.join(HERE, PARTS[name]), "--out", args.out]
  if args.quick:
    cmd.append("--quick")
  if args.threads:
    cmd += ["--threads", str(args.threads)]
  before = _load()
  t0 = time.perf_counter()
  log = os.path.join(log_dir, f"{name}.log")
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=args.part_timeout,
                          check=False)
  info = {"command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
          "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
          "load_before": before, "load_after": _load(), "log": os.path.relpath(log, ROOT)}
  result = os.path.join(args.out, RESULT_NAMES[name] + ".json")
  if proc.returncode == 0 and os.path.exists(result):
    with open(result) as f:
      info["result"] = json.load(f)
    with open(os.path.join(args.out, RESULT_NAMES[name] + ".md")) as f:
      info["markdown"] = f.read()
  else:
    with open(log) as f:
      info["error_tail"] = f.read()[-3000:]
  print(f"[run_all] {name}: rc={proc.returncode} in {info['wall_s']} s (load {before} -> {info['load_after']})",
        flush=True)
  return info


def dry_run_has_flag() -> bool:
  """Whether `python -m vt_jax.train` defines --dry_run (another engineer is adding it)."""
  proc = subprocess.run([sys.executable, "-m", "vt_jax.train", "--helpfull"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  return "--dry_run" in proc.stdout + proc.stderr


# vt_jax.train.dry_run.LOOP_COSTS, not imported: this process only starts the parts and stays free of jax.
LOOP_COSTS = ("auto", "unroll", "marginal", "scale", "once")


def parse_loop_costs(value: str) -> dict[str, str]:
  """'unroll' (every config) or 'sft=unroll,grpo=scale' -> {config: loop cost}."""
  pairs = (dict(item.split("=", 1) for item in value.split(",") if item) if "=" in value
           else {"sft": value, "grpo": value})
  if set(pairs) != {"sft", "grpo"} or not set(pairs.values()) <= set(LOOP_COSTS):
    raise SystemExit(f"--dry_run_loop_cost={value!r}: one of {LOOP_COSTS}, or sft=...,grpo=... with those values")
  return pairs


def run_dry_runs(args, log_dir: str) -> dict:
  if not dry_run_has_flag():
    return {"available": False,
            "note": "`python -m vt_jax.train` has no --dry_run flag yet (vt_jax.train.dry_run exists as a library; "
                    "its CLI integration is in progress), so this section has no table."}
  out = {"available": True, "runs": []}
  loop_costs = parse_loop_costs(args.dry_run_loop_cost)
  # --quick compiles only the first (SFT on v5p-64, ~10 min here); the full run all four (~40 min).
  for config, topology, overrides in DRY_RUNS[:1] if args.quick else DRY_RUNS:
    cmd = [sys.executable, "-m", "vt_jax.train", f"--config={config}", "--dry_run", f"--topology={topology}",
           "--config.model.attention=auto", f"--dry_run_loop_cost={loop_costs[config]}", *overrides]
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.dry_run_timeout,
                            check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
      rc, text = proc.returncode, proc.stdout + ("\n" + proc.stderr if proc.returncode else "")
    except subprocess.TimeoutExpired as e:
      rc, text = "timeout", f"timed out after {args.dry_run_timeout} s\n{(e.stdout or b'')[-2000:]!r}"
    with open(os.path.join(log_dir, f"dry_run_{config}_{topology}.log"), "w") as f:
      f.write(text)
    out["runs"].append({"config": config, "topology": topology, "command": " ".join(cmd[1:]), "returncode": rc,
                        "wall_s": round(time.perf_counter() - t0, 1), "output": text[-6000:]})
    print(f"[run_all] dry run {config} {topology}: rc={rc}", flush=True)
  return out


def _mark(ok: bool | None) -> str:
  return "n/a" if ok is None else ("yes" if ok else "**no**")


def summary(parts: dict, dry: dict | None, args) -> list[str]:
  rows = []
  sft = parts.get("sft", {}).get("result")
  if sft:
    r = sft["results"]
    hf = next(k for k in r if k.startswith("transformers"))
    rows.append(("1. SFT step tokens/s (fp32 both)", f"{r['vt_jax fp32']['tokens_per_s']}",
                 f"{r[hf]['tokens_per_s']}", sft["speedup_fp32"], ">= 2x", sft["speedup_fp32"] >= TARGETS["sft"]))
    if sft.get("speedup_bf16"):
      rows.append(("1b. SFT step tokens/s (ours bf16 compute)", f"{r['vt_jax bf16 compute']['tokens_per_s']}",
                   f"{r[hf]['tokens_per_s']}", sft["speedup_bf16"], ">= 2x", sft["speedup_bf16"] >= TARGETS["sft"]))
  rollout = parts.get("rollout", {}).get("result")
  if rollout:
    r = rollout["results"]
    hf = {dt: next(k for k in r if k.startswith(f"transformers {dt}")) for dt in ("fp32", "bf16")}
    rows.append(("2. rollout tokens/s (fp32 both)", f"{r['vt_jax fp32']['tokens_per_s']}",
                 f"{r[hf['fp32']]['tokens_per_s']}", rollout["speedup_fp32"], ">= 5x",
                 rollout["speedup_fp32"] >= TARGETS["rollout"]))
    rows.append(("2b. rollout tokens/s (bf16 both)", f"{r['vt_jax bf16 weights + compute']['tokens_per_s']}",
                 f"{r[hf['bf16']]['tokens_per_s']}", rollout["speedup_bf16"], ">= 5x",
                 rollout["speedup_bf16"] >= TARGETS["rollout"]))
  inp = parts.get("input", {}).get("result")
  if inp:
    for row in inp["rows"]:
      rows.append((f"3. input samples/s ({row['codec']}, {row['workers']} worker{'s' * (row['workers'] > 1)})",
                   f"{row['ours_samples_per_s']}", f"{row['reference_samples_per_s']}", row["speedup"], ">= 2x",
                   row["speedup"] >= TARGETS["input"]))
  if sft:
    for name in ("vt_jax fp32", "vt_jax bf16 compute"):
      if name in sft["results"]:
        m = sft["results"][name]["mfu_vs_measured_peak"]
        rows.append((f"4. MFU of the train step ({name})", f"{100 * m:.1f}%", "", "", ">= 35%", m >= TARGETS["mfu"]))
  scaling = parts.get("scaling", {}).get("result")
  if scaling and scaling["step_vs_frames"]:
    fr = scaling["step_vs_frames"]
    rows.append((f"5. step time growth, {fr[0]['setting']} -> {fr[-1]['setting']}", f"{fr[-1]['vt_jax_growth']}x",
                 f"{fr[-1]['transformers_growth']}x", "", "~linear", None))
    vr = scaling["vision_vs_frames"]
    if vr:
      rows.append((f"5b. vision tower growth, {vr[0]['frames']} -> {vr[-1]['frames']} frames (blockwise / dense)",
                   f"{vr[-1]['vt_jax blockwise_growth']}x / {vr[-1]['vt_jax dense_growth']}x",
                   f"{vr[-1]['transformers_growth']}x", "", f"~{vr[-1]['frames'] // vr[0]['frames']}x (linear)", None))
  command = f"`python benchmarks/run_all.py {' '.join(sys.argv[1:])}`"
  rerun = any("reused" not in p for p in parts.values()) or (dry is not None and "reused" not in dry)
  # A summary regenerated from earlier results ran nothing itself: the parts below name their sources.
  origin = (f"Command: {command}." if rerun else
            f"Summary regenerated with {command} from earlier runs' results (each part names its source).")
  lines = ["# vt_jax vs transformers: side-by-side benchmarks (`benchmarks/run_all.py`)", "",
           f"{origin} Machine: {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores (shared with other jobs), Python {platform.python_version()}; threads per side: "
           f"{args.threads or 'all cores'} (torch.set_num_threads and XLA's pool via CPU affinity).", "",
           "| benchmark | vt_jax | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
  for name, ours, ref, ratio, target, ok in rows:
    lines.append(f"| {name} | {ours} | {ref} | {f'{ratio}x' if ratio != '' else ''} | {target} | {_mark(ok)} |")
  ran = [f"{n} {p['load_before']} -> {p['load_after']}" for n, p in parts.items() if "reused" not in p]
  lines += [""] + (["Load average (1 min) around each part: " + ", ".join(ran) + ".", ""] if ran else [])
  reused = [f"{n} ({p['reused']})" for n, p in parts.items() if "reused" in p]
  if reused:
    lines += ["Not rerun this time (`--reuse`), taken from their results files of an earlier run: "
              + ", ".join(reused) + ".", ""]
  for name, p in parts.items():
    if "markdown" in p:
      lines += [p["markdown"].rstrip(), ""]
    else:
      lines += [f"## {name}: FAILED (rc={p['returncode']}, log {p['log']})", "", "```",
                p.get("error_tail", "")[-1500:], "```", ""]
  lines += ["## 6. TPU dry run (7B SFT and GRPO on v5p-64 and v5e-256)", ""]
  if dry is None:
    lines.append("Not run (--only excluded it).")
    return lines
  if "reused" in dry:
    lines += [f"Not rerun this time (`--reuse`): the dry runs of `{dry['reused_command']}`, from {dry['reused']}.",
              ""]
  if not dry["available"]:
    lines.append(f"Missing: {dry['note']}")
  else:
    for r in dry["runs"]:
      lines += [f"`python {r['command']}` (rc={r['returncode']}, {r['wall_s']} s):", "", "```", r["output"].rstrip(),
                "```", ""]
  return lines


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="reduced inputs and repeats in every part")
  p.add_argument("--threads", type=int, default=0, help="cores for torch and XLA alike (default: all)")
  p.add_argument("--only", default="sft,rollout,input,scaling,decode,kernels,attention,dry_run")
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--part_timeout", type=int, default=4 * 3600)
  p.add_argument("--dry_run_timeout", type=int, default=3600)
  p.add_argument("--dry_run_loop_cost", default="sft=unroll,grpo=scale",
                 help="how the dry runs cost scanned work, one value or per config. Fixed, so the method never "
                      "depends on how long a compile took under load ('auto' switches from unroll to scale past "
                      "one minute). GRPO defaults to scale: its 7B update unrolled outgrew this 24 GB machine")
  p.add_argument("--reuse", action="store_true",
                 help="summarise the parts left out by --only from their results files of an earlier run "
                      "(marked as such; the dry runs from the previous run_all.json), e.g. to redo only the dry "
                      "runs")
  args = p.parse_args()
  args.out = os.path.abspath(args.out)
  only = [x.strip() for x in args.only.split(",") if x.strip()]
  unknown = sorted(set(only) - set(PARTS) - {"dry_run"})
  if unknown:
    p.error(f"--only: unknown parts {unknown}; choose from {sorted(PARTS) + ['dry_run']}")
  log_dir = os.path.join(args.out, "logs")
  os.makedirs(log_dir, exist_ok=True)
  previous = None
  if args.reuse and os.path.exists(os.path.join(args.out, "run_all.json")):
    with open(os.path.join(args.out, "run_all.json")) as f:
      previous = json.load(f)
  t0 = time.perf_counter()
  parts = {name: run_part(name, args, log_dir) for name in PARTS if name in only}
  if args.reuse:
    for name in PARTS:
      if name not in parts and (info := reuse_part(name, args)) is not None:
        parts[name] = info
    parts = {name: parts[name] for name in PARTS if name in parts}
  if "dry_run" in only:
    dry = run_dry_runs(args, log_dir)
  else:
    dry = reuse_dry_runs(args, previous) if args.reuse else None
  lines = summary(parts, dry, args)
  record = {"command": "python benchmarks/run_all.py " + " ".join(sys.argv[1:]), "quick": args.quick,
            "threads": args.threads or len(os.sched_getaffinity(0)), "wall_s": round(time.perf_counter() - t0, 1),
            "parts": {n: {k: v for k, v in p.items() if k != "markdown"} for n, p in parts.items()},
            "dry_run": dry}
  with open(os.path.join(args.out, "run_all.json"), "w") as f:
    json.dump(record, f, indent=1, default=str)
  with open(os.path.join(args.out, "run_all.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  failed = [n for n, p in parts.items() if p["returncode"] != 0]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
