"""CPU kernels in C for the steps torch has no fast path for (kernels.c), loaded with ctypes.

Today: the sorted top-k of short rows that product-key retrieval does per (token, head)
and key half (k = 16 of n = 256 sub-key scores; then k of the ~3k candidates). On a
CPU ``torch.topk`` spends ~8 ns per value there (single thread, k = 16 of 256), about
half of a small PEER model's training step; the kernel here finds a threshold that at
least k values reach, keeps only those and ranks them, in branch-free loops the
compiler vectorises: 4x faster on one thread (kernels.c says how).

The library is compiled on first use with the system's C compiler (``$CC``, else ``cc``
or ``gcc``) into a cache folder (``$PEER_DIST_CACHE``, else ``$XDG_CACHE_HOME/peer_dist``,
else ``~/.cache/peer_dist``), named by a hash of the source, the flags and the machine
type, and moved into place atomically, so concurrent ranks never see a half-written
file. ``python -m peer_dist.native`` builds it ahead of time (launch/setup.sh does).
Without a compiler the callers fall back to torch (same results, slower) after one
warning; ``PEER_DIST_NATIVE=0`` selects the torch path on purpose.

Rows are split over ``torch.get_num_threads()`` threads (ctypes releases the GIL);
rows are independent, so results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from peer_dist.log import get_logger

_SOURCE = Path(__file__).with_name("kernels.c")
# Portable flags only: a cache folder may be shared by nodes with different CPUs.
_CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared")
# Below this many values per call one thread is faster than handing rows to the pool.
_MIN_VALUES_PER_THREAD = 1 << 16

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded (no compiler, failed build)."""


def enabled() -> bool:
    """Whether the native kernels are wanted (``PEER_DIST_NATIVE`` is not 0)."""
    return os.environ.get("PEER_DIST_NATIVE", "1") != "0"


def cache_dir() -> Path:
    if os.environ.get("PEER_DIST_CACHE"):
        return Path(os.environ["PEER_DIST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "peer_dist"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C compiler found (set CC, or install gcc)")


def library_path() -> Path:
    """Where the compiled library for this source, these flags and this machine type lives."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + platform.machine().encode())
    return cache_dir() / f"peer_dist_native-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless the cached one exists; return its path."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: another rank may be building the same file.
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [_compiler(), *_CFLAGS, "-o", tmp, str(_SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError) as err:
        get_logger().warning("native CPU kernels unavailable, using torch instead (slower): %s", err)
        return None
    lib.peer_topk_rows_f32.restype = ctypes.c_int
    lib.peer_topk_rows_f32.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64]
    return lib


class _Pool:
    """A thread pool per process (rebuilt after fork: a forked child has no pool threads)."""

    def __init__(self) -> None:
        self.pid, self.pool, self.size = -1, None, 0

    def get(self, size: int) -> ThreadPoolExecutor:
        if self.pool is None or self.pid != os.getpid() or self.size != size:
            self.pool = ThreadPoolExecutor(size, thread_name_prefix="peer_dist_native")
            self.pid, self.size = os.getpid(), size
        return self.pool


_POOL = _Pool()


def _over_rows(call: Callable[[int, int], None], num_rows: int, values_per_row: int) -> None:
    """call(row_begin, row_end) over all rows, split across torch's intra-op thread count."""
    threads = min(torch.get_num_threads(), max(1, num_rows * values_per_row // _MIN_VALUES_PER_THREAD))
    if threads <= 1:
        call(0, num_rows)
        return
    bounds = [num_rows * t // threads for t in range(threads + 1)]
    futures = [_POOL.get(threads).submit(call, bounds[t], bounds[t + 1]) for t in range(threads)]
    for future in futures:
        future.result()


def topk_available(x: Tensor) -> bool:
    """Whether :func:`topk` runs natively on ``x`` (else callers use torch.topk)."""
    return (enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.stride(1) == 1 and _library() is not None)


def topk(x_RC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sorted top-``k`` per row of a float32 CPU (R, C) tensor: (values (R, k), int64 columns (R, k)).

    Same values as ``x_RC.topk(k, dim=-1, sorted=True)`` (NaN ranks highest, as there); equal
    values come in column order. Not differentiable: gather the values from ``x`` for autograd.
    Check :func:`topk_available` first.
    """
    lib = _library()
    num_rows, cols = x_RC.shape
    if not 1 <= k <= cols or lib is None:
        raise ValueError(f"topk needs 1 <= k <= {cols} and the native library, got k = {k}")
    x_RC = x_RC.detach()
    values_RK = torch.empty(num_rows, k, dtype=x_RC.dtype)
    ids_RK = torch.empty(num_rows, k, dtype=torch.int64)
    args = (x_RC.data_ptr(), cols, x_RC.stride(0), k, values_RK.data_ptr(), ids_RK.data_ptr())

    def rows(begin: int, end: int) -> None:
        if lib.peer_topk_rows_f32(*args, begin, end) != 0:
            raise MemoryError(f"native topk: no memory for a scratch row of {cols} values")

    _over_rows(rows, num_rows, cols)
    return values_RK, ids_RK
