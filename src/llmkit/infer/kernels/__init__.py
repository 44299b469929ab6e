"""CPU decode kernels (gemv.c), compiled on first use with the system C compiler and called through ctypes.

    from llmkit.infer import kernels
    kernels.available()               # True once gemv.c compiled and loaded here; kernels.why_not() says why not
    y = kernels.linear_f32(x, w)      # x (M, K) fp32, w (N, K) fp32 -> (M, N)
    y = kernels.linear_q8(x, q, s)    # q int8 (N, K), s (N, K/g) fp32
    y = kernels.linear_q4(x, q, s)    # q uint8 (N, K/2) in GGUF Q4_0 nibble order, s (N, K/g) fp32

Why our own kernels: at one token per decode step a Linear is a matrix-vector product bound by how fast its
weight streams from memory. On the 2-core AVX-512 machine the project is measured on, MKL's fp32 GEMV read
a decoder's weights (out of cache) at ~15 GB/s and PyTorch's shipped weight-only kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) at under 1 GB/s, while a plain streaming
kernel reads fp32 at ~27 GB/s and INT8 / INT4 weights several times faster
(`python benchmarks/gemv_kernels.py`, figures in docs/engine.md).

The library is built once per source version, compiler flags and CPU into `$LLMKIT_KERNEL_CACHE` (default
~/.cache/llmkit/kernels) with `-O3 -march=native -fopenmp`, linked against the libgomp torch ships so both
share one OpenMP thread pool. No compiler, a failed build or `LLMKIT_KERNELS=0`: `available()` is False and
the callers (`llmkit.infer.weight_only`, `Int8Linear`) use their PyTorch paths, which compute the same
values (tests compare both).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["FUSED_MAX_ROWS", "MAX_ROWS", "available", "dequantize_q4", "dequantize_q8", "linear_f32", "linear_q4",
           "linear_q8", "quantize_rows_q8", "turned_off", "why_not"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


MAX_ROWS = 64 if "avx512f" in _cpu_flags().split() else 16
"""Most input rows (tokens) the kernels take per call: past that a matrix-matrix product (BLAS) reuses each
weight from cache across rows and wins; callers switch to it. With AVX-512 the fp32 kernel's 4 x 4 register
tiles beat MKL up to 64 rows (2x at 32 rows on the 2-core Zen 4 this is measured on:
`benchmarks/gemv_kernels.py --rows 1,8,32,64`); with AVX2 only, its dot products fall behind BLAS past ~16."""

FUSED_MAX_ROWS = 64
"""Most rows (running requests) a fused decode layer (`kernels.fused`) takes, whatever `MAX_ROWS`: even where a
lone Linear is faster in BLAS, the fused layer spares the PyTorch path's per-layer KV gather,
attention over padded keys and ~40 operator dispatches, and quantized weights stay quantized (no per-step
dequantization); at 32 rows on SmolLM2 it measured faster in fp32, INT8 and INT4 (docs/engine.md)."""

_SOURCE = Path(__file__).with_name("gemv.c")
_lib: ctypes.CDLL | None = None
_error: str | None = None
_loaded = False


def _omp_link_args() -> list[str]:
    """Link against torch's own libgomp when it ships one (Linux wheels), else the compiler's OpenMP."""
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").is_file():
        return [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-l:libgomp.so.1"]
    return ["-lgomp"]


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    link = _omp_link_args() + ["-lm"]
    key = hashlib.sha256("\n".join([_SOURCE.read_text(), cc, *flags, *link, _cpu_flags()]).encode()).hexdigest()
    cache = Path(os.environ.get("LLMKIT_KERNEL_CACHE") or Path.home() / ".cache" / "llmkit" / "kernels")
    out = cache / f"libllmkit_gemv-{key[:16]}.so"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        proc = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp_path), *link], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {_SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_path, out)  # atomic: a concurrent process sees the whole library or none
    finally:
        tmp_path.unlink(missing_ok=True)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _loaded
    if _loaded:
        return _lib
    _loaded = True
    if os.environ.get("LLMKIT_KERNELS", "1") == "0":
        _error = "disabled by LLMKIT_KERNELS=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        _error = str(e)
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemv_f32.argtypes = [p, i64, i64, p, p, i64, i64, i64, c_int]
    lib.quant_rows_q8.argtypes = [p, i64, i64, p, p, i64]
    lib.gemv_q8.argtypes = [p, p, i64, p, p, i64, p, i64, i64, i64, c_int]
    lib.gemv_q4.argtypes = [p, p, i64, p, p, i64, p, i64, i64, i64, c_int]
    for f in (lib.gemv_f32, lib.quant_rows_q8, lib.gemv_q8, lib.gemv_q4):
        f.restype = None
    lib.dequant_q8.argtypes = [p, p, i64, p, i64, i64, c_int]
    lib.dequant_q4.argtypes = [p, p, i64, p, i64, i64, c_int]
    lib.dequant_q8.restype = lib.dequant_q4.restype = None
    lib.decode_layer_scratch.argtypes = [i64] * 7
    lib.decode_layer_scratch.restype = i64
    f32 = ctypes.c_float
    lib.decode_layer.argtypes = [p, i64, i64, p, p, f32, p, p, p, p, p, p, p, f32, i64, i64, i64, f32, i64, p, p,
                                 p, p, i64, p, i64, p, i64, p, c_int]
    lib.decode_layer.restype = None
    _lib = lib
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded in this process (builds them on the first call)."""
    return _load() is not None


def why_not() -> str | None:
    """Why `available()` is False (compiler error, no compiler, disabled), or None when it is True."""
    _load()
    return _error


@contextlib.contextmanager
def turned_off():
    """Inside this block every layer takes its PyTorch path (`MAX_ROWS`, `FUSED_MAX_ROWS` 0): the eager reference the kernels
    are measured against, on the same model objects."""
    global MAX_ROWS, FUSED_MAX_ROWS
    saved, MAX_ROWS, FUSED_MAX_ROWS = (MAX_ROWS, FUSED_MAX_ROWS), 0, 0
    try:
        yield
    finally:
        MAX_ROWS, FUSED_MAX_ROWS = saved


def _check(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.dim() != 2 or x.size(1) != K:
        raise ValueError(f"x: expected (M, {K}), got {tuple(x.shape)}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x: expected fp32 on CPU, got {x.dtype} on {x.device}")
    return x.contiguous()


def library() -> ctypes.CDLL:
    """The loaded kernel library (raises RuntimeError saying why when unavailable)."""
    return _lib_or_raise()


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"llmkit CPU kernels unavailable: {_error}")
    return lib


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: fp32 (M, K), w: fp32 (N, K) contiguous -> x @ w.T, fp32 (M, N)."""
    lib = _lib_or_raise()
    N, K = w.shape
    x = _check(x, K)
    if not w.is_contiguous():
        raise ValueError("w: must be contiguous (out, in), row-major")
    y = torch.empty(x.size(0), N)
    lib.gemv_f32(x.data_ptr(), x.size(0), K, w.data_ptr(), y.data_ptr(), N, N, K, torch.get_num_threads())
    return y


def quantize_rows_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 (M, K), K % 32 == 0 -> (int8 (M, K), fp32 scales (M, K/32)): one symmetric scale per block
    of 32, max |x_block| / 127 (the kernels' activation format; ggml's Q8_0)."""
    lib = _lib_or_raise()
    M, K = x.shape
    if K % 32:
        raise ValueError(f"K = {K}: must be a multiple of 32")
    x = _check(x, K)
    xq = torch.empty(M, K, dtype=torch.int8)
    dx = torch.empty(M, K // 32)
    lib.quant_rows_q8(x.data_ptr(), M, K, xq.data_ptr(), dx.data_ptr(), K)
    return xq, dx


def _group(K: int, s: torch.Tensor, group_size: int | None) -> int:
    """The group size of scales (N, G) over K columns: `group_size`, or K / G. The last group may be shorter
    (G = ceil(K / g)), so g = 128 also serves K = 576."""
    G = s.size(1)
    g = group_size if group_size is not None else (K // G if K % G == 0 else 0)
    if g <= 0 or g % 32 or -(-K // g) != G:
        raise ValueError(f"scales {tuple(s.shape)} do not fit {K} columns in groups of {group_size or 'K / G'} "
                         "(a multiple of 32)")
    return g


def linear_q8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """x: fp32 (M, K); q: int8 (N, K); s: fp32 (N, ceil(K/g)) with g % 32 == 0 -> fp32 (M, N) ~= x @ (s * q).T,
    the activations quantized per 32 as `quantize_rows_q8`. group_size None: K / s.size(1)."""
    lib = _lib_or_raise()
    N, K = q.shape
    g = _group(K, s, group_size)
    xq, dx = quantize_rows_q8(x)
    y = torch.empty(x.size(0), N)
    lib.gemv_q8(xq.data_ptr(), dx.data_ptr(), x.size(0), q.contiguous().data_ptr(), s.contiguous().data_ptr(), g,
                y.data_ptr(), N, N, K, torch.get_num_threads())
    return y


def linear_q4(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """x: fp32 (M, K); q: uint8 (N, K/2) in Q4_0 nibble order; s: fp32 (N, ceil(K/g)) -> fp32 (M, N) ~=
    x @ dequantize_q4(q, s, g).T, the activations quantized per 32 as `quantize_rows_q8`."""
    lib = _lib_or_raise()
    N, K = q.size(0), 2 * q.size(1)
    g = _group(K, s, group_size)
    xq, dx = quantize_rows_q8(x)
    y = torch.empty(x.size(0), N)
    lib.gemv_q4(xq.data_ptr(), dx.data_ptr(), x.size(0), q.contiguous().data_ptr(), s.contiguous().data_ptr(), g,
                y.data_ptr(), N, N, K, torch.get_num_threads())
    return y


# -- the same formats in PyTorch: the reference the kernels are tested against, and the prefill path ----


def _expand_scales(s: torch.Tensor, K: int, group_size: int | None) -> torch.Tensor:
    """(N, G) group scales -> (N, K) per-column scales."""
    g = group_size if group_size is not None else K // s.size(1)
    return s.repeat_interleave(g, dim=1)[:, :K]



def _dequantize_in_c(fn, q: torch.Tensor, s: torch.Tensor, group_size: int | None, N: int, K: int,
                     out: torch.Tensor | None) -> torch.Tensor:
    """fp32 (N, K) from codes `q` and scales `s` through the C routine `fn` (dequant_q8 / dequant_q4), into
    `out` when given (contiguous fp32 (N, K))."""
    out = torch.empty(N, K) if out is None else out
    fn(q.contiguous().data_ptr(), s.contiguous().data_ptr(), _group(K, s, group_size), out.data_ptr(), N, K,
       torch.get_num_threads())
    return out
def dequantize_q8(q: torch.Tensor, s: torch.Tensor, group_size: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (N, K), fp32 (N, ceil(K/g)) -> fp32 (N, K) = s per group * q (group_size None: K / G). In C when the
    kernels are loaded (memory speed; the PyTorch version below is the reference and the fallback)."""
    N, K = q.shape
    if _load() is not None and q.device.type == "cpu":
        return _dequantize_in_c(_lib.dequant_q8, q, s, group_size, N, K, out)
    return q.float() * _expand_scales(s, K, group_size)


def dequantize_q4(q: torch.Tensor, s: torch.Tensor, group_size: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, K/2) in Q4_0 nibble order, fp32 (N, ceil(K/g)) -> fp32 (N, K) = s per group * (nibble - 8), into
    `out` (fp32 (N, K) contiguous) when given. In C when the kernels are loaded; the PyTorch lines below are the
    reference and the fallback."""
    N, half = q.shape
    K = 2 * half
    if _load() is not None and q.device.type == "cpu":
        return _dequantize_in_c(_lib.dequant_q4, q, s, group_size, N, K, out)
    blocks = q.view(N, K // 32, 16)
    nib = torch.cat((blocks & 0x0F, blocks >> 4), dim=-1).view(N, K).float() - 8.0  # weights j, then j + 16
    return nib * _expand_scales(s, K, group_size)
