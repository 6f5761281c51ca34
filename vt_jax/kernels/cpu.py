"""x86-64 CPU kernels for the decode loop: XLA FFI custom calls, built on first use with the system C++ compiler.

`packed_dot(x, packed, n)`: a few rows against a weight matrix packed once per generation by `pack_table`,
`[M, D] x [N, D]^T -> [M, N]` fp32 -- a decode step's logits and its decoder layers' projections
(`cpu_packed_dot.cc` says why: XLA:CPU's GEMM library repacks the weights on every call). On the small preset,
8 rows: logits (151,936 x 512) bf16 3.1 vs 6.8 ms, fp32 6.7 vs 12.9 ms; the 8 decoder layers' 56
projections 1.3 vs 2.9 ms (`benchmarks/bench_decode.py` times them in place).

`decode_attention(q, k, v, q_segment_ids, kv_segment_ids, index, scale)`: one new token per row against a
layer of the KV cache, reading only the slots up to `index` (`cpu_decode_attention.cc`).

`choose_tokens(logits, u, temperature=, greedy=)`: the greedy or untruncated sampled token choice of
`sampler.choose_tokens` (`cpu_sample.cc`). `benchmarks/bench_kernels.py` times each kernel against the XLA
ops it replaces.

`unavailable()` is None where the kernels run, else why not: not x86-64 Linux, no AVX-512F / AVX512-BF16,
no C++17 compiler (`CXX`, else c++ / g++ / clang++), or `VT_JAX_CPU_KERNELS=0`. Callers then use XLA.
The library (all three sources) is cached under `VT_JAX_KERNEL_CACHE` (default ~/.cache/vt_jax/kernels),
keyed by the sources, jaxlib's version and the compiler; concurrent first builds are safe (each writes a
temporary, then renames).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "cpu_packed_dot.cc", _HERE / "cpu_decode_attention.cc", _HERE / "cpu_sample.cc")
HEADERS = (_HERE / "cpu_common.h",)
TARGET = "vt_cpu_packed_dot"
ATTENTION_TARGET = "vt_cpu_decode_attention"
SAMPLE_TARGET = "vt_cpu_sample"
BLOCK = 32  # output rows per packed block (kBlock in the source)
ENV_SWITCH = "VT_JAX_CPU_KERNELS"

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "why": reason it is unavailable, or "lib": the loaded library
log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
  pass


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("VT_JAX_KERNEL_CACHE") or pathlib.Path.home() / ".cache" / "vt_jax" / "kernels")


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise KernelUnavailable("no C++ compiler found (set CXX)")


def build() -> pathlib.Path:
  """The compiled library, built into the cache directory unless already there."""
  cxx = _compiler()
  source = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
  key = hashlib.sha256(source + jax.lib.__version__.encode() + cxx.encode()).hexdigest()[:16]
  out = cache_dir() / f"cpu_kernels-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", *map(str, SOURCES),
         "-o", str(tmp)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    tmp.unlink(missing_ok=True)
    raise KernelUnavailable(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  os.replace(tmp, out)
  return out


def _load() -> None:
  """Builds, loads and registers the kernel once per process; records why not if it cannot."""
  with _lock:
    if _loaded:
      return
    try:
      if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"x86-64 Linux only (this is {sys.platform} / {platform.machine()})")
      lib = ctypes.CDLL(str(build()))
      if not lib.vt_cpu_packed_dot_supported():
        raise KernelUnavailable("this CPU lacks AVX-512F or AVX512-BF16")
      jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VtCpuPackedDot), platform="cpu")
      jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.VtCpuDecodeAttention), platform="cpu")
      jax.ffi.register_ffi_target(SAMPLE_TARGET, jax.ffi.pycapsule(lib.VtCpuSample), platform="cpu")
      _loaded["lib"] = lib
    except (KernelUnavailable, OSError) as e:
      _loaded["why"] = str(e)
      log.warning("CPU decode kernels unavailable, XLA runs instead: %s", e)


def unavailable() -> str | None:
  """None where `packed_dot` can run in this process, else the reason."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return f"disabled by {ENV_SWITCH}=0"
  _load()
  return _loaded.get("why")


def _require() -> None:
  if (why := unavailable()) is not None:
    raise KernelUnavailable(why)


def packable(table, contracted: int, dtype=None) -> bool:
  """Whether a weight matrix (`[N, D]` or `[D, N]`, D = contracted), cast to dtype (default its own), can go
  through the kernel here: bf16 (even D) or fp32, a concrete array on one CPU device (the custom call is
  not partitioned), and the kernel available."""
  if isinstance(table, jax.core.Tracer) or not isinstance(table, jax.Array) or table.ndim != 2:
    return False
  dtype = jnp.dtype(table.dtype if dtype is None else dtype)
  if dtype not in (jnp.bfloat16, jnp.float32) or (dtype == jnp.bfloat16 and contracted % 2):
    return False
  devices = table.sharding.device_set
  if len(devices) != 1 or next(iter(devices)).platform != "cpu":
    return False
  return unavailable() is None


@jax.jit
def pack_table(table: jax.Array) -> jax.Array:
  """`[V, D]` -> `[ceil(V / 32), D / P, 32, P]` (P = 2 for bf16, 1 for fp32): element (b, p, j, t) is
  table[32 b + j, P p + t], zero past V."""
  vocab, d = table.shape
  pair = 2 if table.dtype == jnp.bfloat16 else 1
  blocks = -(-vocab // BLOCK)
  table = jnp.pad(table, ((0, blocks * BLOCK - vocab), (0, 0)))
  return table.reshape(blocks, BLOCK, d // pair, pair).transpose(0, 2, 1, 3)


def packed_dot(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
  """`[M, D]` rows (cast to the table's dtype) against a `pack_table` table of n rows -> `[M, n]` fp32."""
  if x.ndim != 2 or packed.ndim != 4 or x.shape[1] != packed.shape[1] * packed.shape[3] or \
      packed.shape[0] != -(-n // BLOCK):
    raise ValueError(f"packed_dot: x {x.shape} and n={n} do not match a packed table {packed.shape}")
  _require()
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
  return call(x.astype(packed.dtype), packed, vocab=np.int64(n))


def attention_supported(dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether `decode_attention` takes these shapes here: bf16 (head_dim % 32 == 0) or fp32 (% 16), 1 to 8
  query heads per kv head, and the kernels available."""
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.bfloat16, jnp.float32) or head_dim % (32 if dtype == jnp.bfloat16 else 16):
    return False
  if num_heads % num_kv_heads or not 1 <= num_heads // num_kv_heads <= 8:
    return False
  return unavailable() is None


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                     index: jax.Array, scale: float) -> jax.Array:
  """One query per row against a layer of the KV cache, as `attention.cache_attention` with T = 1.

  q `[B, 1, H, D]`, k / v `[B, K, S, D]` in q's dtype, q_segment_ids `[B, 1]`, kv_segment_ids `[B, S]`,
  index `[]` int32 (the query's position: slot s is earlier where s <= index). Slot s is attended where
  s <= index and its segment id equals the query's. Returns `[B, 1, H, D]` in q's dtype.
  """
  b, t, h, d = q.shape
  if t != 1 or k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"decode_attention: q {q.shape}, k {k.shape}, v {v.shape}")
  _require()
  call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, h, d), q.dtype))
  out = call(q.reshape(b, h, d), k.astype(q.dtype), v.astype(q.dtype), q_segment_ids.reshape(b).astype(jnp.int32),
             kv_segment_ids.astype(jnp.int32), jnp.asarray(index, jnp.int32), scale=np.float32(scale))
  return out.reshape(b, 1, h, d)


def choose_tokens(logits: jax.Array, u: jax.Array, *, temperature: float, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """`sampler.choose_tokens` without top-k / top-p, from fp32 logits `[N, V]` and uniforms `u` `[N, 2]`:
  (tokens `[N]` int32, log p(token) `[N]` fp32 under softmax(logits / temperature); plain softmax when
  greedy)."""
  _require()
  n = logits.shape[0]
  call = jax.ffi.ffi_call(SAMPLE_TARGET, (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32)))
  return call(logits.astype(jnp.float32), u.astype(jnp.float32), temperature=np.float32(temperature),
              greedy=bool(greedy))
