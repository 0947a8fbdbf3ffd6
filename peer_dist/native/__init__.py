"""CPU kernels in C for the steps torch has no fast path for (kernels.c), loaded with ctypes.

- :func:`topk`: the sorted top-k of short rows that product-key retrieval does per (token,
  head) and key half (k = 16 of n = 256 sub-key scores, then of the 50 candidates).
  ``torch.topk`` spends ~8 ns per value there on one CPU thread, about half of a small PEER
  model's step; the kernel finds a threshold that at least k values reach, keeps only those
  and ranks them, in branch-free loops the compiler vectorises: 4x faster.
- :func:`scores_topk`: the sub-key scores and their top-k in one loop per query, without the
  (rows, n) score matrix; used from n = 512 (faster there, not at 256).
- :func:`candidates_topk`: the last step of retrieval, the candidate pairs' summed scores,
  their top-k and the composite ids in one loop per row.
- :func:`argsort_ids`: the stable argsort that groups a layer call's (token, expert) pairs by
  expert (peer_dist.model.expert_ops.ExpertRouting), a radix sort over the ids' bits.
- :func:`gather_dot`: the u-side dot products of the expert compute, one per pair, in expert
  order (consecutive pairs reuse a table row), written straight to slot order.
- :func:`adamw_rows`: the row-sparse AdamW of the expert tables (peer_dist.train.sparse_tables)
  in one pass over each touched row instead of a gather, seven elementwise passes and a scatter.

- :func:`segment_sum`: the table gradients' rows, one per distinct expert, into a buffer the
  table keeps across steps (a fresh allocation of that size costs more in page faults).

The bag-sums stay with ATen's ``embedding_bag``: C loops in expert order measured slower.

The library is compiled on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into a cache folder (``$PEER_DIST_CACHE``, else
``$XDG_CACHE_HOME/peer_dist``, else ``~/.cache/peer_dist``), named by a hash of the source,
the flags and the machine type, and moved into place atomically, so concurrent ranks never
see a half-written file. ``python -m peer_dist.native`` builds it ahead of time
(launch/setup.sh does). Without a compiler the callers fall back to torch (same results up
to rounding, slower) after one warning; ``PEER_DIST_NATIVE=0`` (or :func:`disabled`)
selects the torch path on purpose.

Rows are split over ``torch.get_num_threads()`` OpenMP threads, the same runtime (and so the
same threads) torch's CPU ops use: a separate pool would compete with torch's threads, which
spin for a while after each op (measured: 2 threads of our own ran the top-k slower than one).
No kernel's result depends on the split.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from peer_dist.log import get_logger

_SOURCE = Path(__file__).with_name("kernels.c")
# Portable flags only: a cache folder may be shared by nodes with different CPUs.
_CFLAGS = ("-O3", "-std=gnu99", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared")
# libgomp.so.1, the soname of the OpenMP runtime torch's CPU wheel bundles and has loaded by the
# time the kernels load: their parallel regions run on torch's own intra-op threads.
_OPENMP_FLAGS = ("-fopenmp",)
# Below this many values per call one thread is faster than splitting the rows.
_MIN_VALUES_PER_THREAD = 1 << 16

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded (no compiler, failed build)."""


_switched_off = False


def enabled() -> bool:
    """Whether the native kernels are wanted (``PEER_DIST_NATIVE`` is not 0, not inside :func:`disabled`)."""
    return not _switched_off and os.environ.get("PEER_DIST_NATIVE", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The torch path everywhere inside the block (benchmarks measure references with it)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


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


def library_path(openmp: bool = True) -> Path:
    """Where the compiled library for this source, these flags and this machine type lives."""
    flags = " ".join((*_CFLAGS, *(_OPENMP_FLAGS if openmp else ())))
    digest = hashlib.sha256(_SOURCE.read_bytes() + flags.encode() + platform.machine().encode())
    return cache_dir() / f"peer_dist_native-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless the cached one exists; return its path.

    With OpenMP when the compiler has it (the kernels then split rows over torch's threads),
    else without (one thread per call).
    """
    for openmp in (True, False):
        target = library_path(openmp)
        if target.exists():
            return target
    compiler = _compiler()
    errors = []
    for openmp in (True, False):
        try:
            return _compile(compiler, library_path(openmp), _OPENMP_FLAGS if openmp else ())
        except NativeBuildError as err:
            errors.append(str(err))
    raise NativeBuildError("\n".join(errors))


def _compile(compiler: str, target: Path, extra: tuple[str, ...]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: another rank may be building the same file.
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_CFLAGS, *extra, "-o", tmp, str(_SOURCE), "-lm"]
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
    lib.peer_topk_rows_f32.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, ctypes.c_int]
    lib.peer_scores_topk_f32.restype = ctypes.c_int
    lib.peer_scores_topk_f32.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, ctypes.c_int]
    lib.peer_candidates_topk_f32.restype = ctypes.c_int
    lib.peer_candidates_topk_f32.argtypes = [_PTR] * 4 + [_I64, _PTR, _PTR] + [_I64] * 3 + [_PTR] * 4 + [_I64, _I64, ctypes.c_int]
    lib.peer_segment_sum_f32.restype = None
    lib.peer_segment_sum_f32.argtypes = [_PTR] * 5 + [_I64, _I64, _I64, _PTR, _I64, _I64, ctypes.c_int]
    lib.peer_adamw_rows_f32.restype = None
    lib.peer_argsort_ids.restype = ctypes.c_int
    lib.peer_gather_dot_f32.restype = None
    lib.peer_gather_dot_f32.argtypes = [_PTR] * 5 + [_I64, _PTR, _I64, _I64, ctypes.c_int]
    lib.peer_argsort_ids.argtypes = [_PTR, _I64, _I64, _PTR, _PTR]
    lib.peer_adamw_rows_f32.argtypes = [_PTR] * 7 + [_I64] + [ctypes.c_float] * 6 + [_I64, _I64, ctypes.c_int]
    return lib


def _over_rows(call: Callable[[int, int, int], None], num_rows: int, values_per_row: int) -> None:
    """call(0, num_rows, threads): the kernel splits the rows over ``threads`` OpenMP threads,
    torch's intra-op count (fewer for small calls, where one thread is faster)."""
    threads = min(torch.get_num_threads(), max(1, num_rows * values_per_row // _MIN_VALUES_PER_THREAD))
    call(0, num_rows, threads)


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

    def rows(begin: int, end: int, threads: int) -> None:
        if lib.peer_topk_rows_f32(*args, begin, end, threads) != 0:
            raise MemoryError(f"native topk: no memory for a scratch row of {cols} values")

    _over_rows(rows, num_rows, cols)
    return values_RK, ids_RK


def scores_topk(q_RC: Tensor, keys_SC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sorted top-``k`` of the scores q . key for every query row, without the (R, S) score matrix.

    ``q_RC``: (R, C) fp32 CPU queries (rows may be strided); ``keys_SC``: (S, C) keys. Returns
    (values (R, k), int64 key indices (R, k)), as ``(q_RC @ keys_SC.T).topk(k)`` up to the
    rounding of the dot products. Not differentiable. Check :func:`topk_available` on ``q_RC``.
    """
    lib = _library()
    num_rows, dim = q_RC.shape
    cols = keys_SC.shape[0]
    if not 1 <= k <= cols or lib is None or keys_SC.shape[1] != dim:
        raise ValueError(f"scores_topk needs (R, C) queries, (S, C) keys, 1 <= k <= S, got {tuple(q_RC.shape)}, "
                         f"{tuple(keys_SC.shape)}, k = {k}")
    keys_t = keys_SC.detach().t().contiguous().to(torch.float32)
    q_RC = q_RC.detach()
    values_RK = torch.empty(num_rows, k, dtype=torch.float32)
    ids_RK = torch.empty(num_rows, k, dtype=torch.int64)
    args = (q_RC.data_ptr(), q_RC.stride(0), keys_t.data_ptr(), dim, cols, k, values_RK.data_ptr(), ids_RK.data_ptr())

    def rows(begin: int, end: int, threads: int) -> None:
        if lib.peer_scores_topk_f32(*args, begin, end, threads) != 0:
            raise MemoryError(f"native scores_topk: no memory for a scratch row of {cols} values")

    _over_rows(rows, num_rows, cols * dim)
    return values_RK, ids_RK


def candidates_topk(scores_a_RK: Tensor, scores_b_RK: Tensor, ids_a_RK: Tensor, ids_b_RK: Tensor,
                    rank_a_M: Tensor, rank_b_M: Tensor, k: int, num_sub: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Product-key candidates to the final top-k, per row (see peer_dist.model.product_keys).

    Inputs: each side's sorted top scores and sub-key ids (R, K) (contiguous fp32 / int64 CPU)
    and the M candidate rank pairs. Returns (scores (R, k), global ids ida * num_sub + idb,
    side-a ranks, side-b ranks), the ranks int64 (R, k). Not differentiable.
    """
    lib = _library()
    if lib is None:
        raise ValueError("candidates_topk needs the native library")
    num_rows, side_k = scores_a_RK.shape
    scores_RK = torch.empty(num_rows, k, dtype=torch.float32)
    ids_RK, ranks_a_RK, ranks_b_RK = (torch.empty(num_rows, k, dtype=torch.int64) for _ in range(3))
    tensors = (scores_a_RK.detach(), scores_b_RK.detach(), ids_a_RK, ids_b_RK)
    args = (*(t.data_ptr() for t in tensors), side_k, rank_a_M.data_ptr(), rank_b_M.data_ptr(), rank_a_M.numel(), k,
            num_sub, scores_RK.data_ptr(), ids_RK.data_ptr(), ranks_a_RK.data_ptr(), ranks_b_RK.data_ptr())

    def rows(begin: int, end: int, threads: int) -> None:
        if lib.peer_candidates_topk_f32(*args, begin, end, threads) != 0:
            raise MemoryError("native candidates_topk: no memory for a scratch row")

    _over_rows(rows, num_rows, rank_a_M.numel() * 4)
    return scores_RK, ids_RK, ranks_a_RK, ranks_b_RK


def adamw_rows_available(*tensors: Tensor) -> bool:
    """Whether :func:`adamw_rows` runs natively on these tensors (all contiguous fp32/int64 on the CPU)."""
    return (enabled() and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and _library() is not None)


def adamw_rows(param_ND: Tensor, exp_avg_ND: Tensor, exp_avg_sq_ND: Tensor, row_step_N: Tensor, ids_U: Tensor,
               grad_UD: Tensor, row_lr_U: Tensor | None, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, grad_scale: float) -> None:
    """AdamW with a step count per row on rows ``ids_U`` (distinct) of an fp32 table, in place.

    ``grad_UD``: their fp32 gradients, multiplied by ``grad_scale`` first; ``row_lr_U``: a
    learning-rate factor per row or None. The arithmetic is torch AdamW's (kernels.c writes it
    out); check :func:`adamw_rows_available` first.
    """
    lib = _library()
    if lib is None or param_ND.dtype != torch.float32 or grad_UD.dtype != torch.float32:
        raise ValueError("adamw_rows needs fp32 tables and gradients and the native library")
    width = param_ND.shape[1]
    row_lr = None if row_lr_U is None else row_lr_U.to(torch.float32).contiguous()
    ptrs = (param_ND.data_ptr(), exp_avg_ND.data_ptr(), exp_avg_sq_ND.data_ptr(), row_step_N.data_ptr(),
            ids_U.data_ptr(), grad_UD.data_ptr(), None if row_lr is None else row_lr.data_ptr())
    scalars = (width, lr, betas[0], betas[1], eps, weight_decay, grad_scale)
    _over_rows(lambda begin, end, threads: lib.peer_adamw_rows_f32(*ptrs, *scalars, begin, end, threads), ids_U.numel(), width)


def argsort_ids_available(ids: Tensor) -> bool:
    """Whether :func:`argsort_ids` runs natively on ``ids`` (a contiguous int64 CPU vector)."""
    return (enabled() and ids.device.type == "cpu" and ids.dtype == torch.int64 and ids.dim() == 1
            and ids.is_contiguous() and _library() is not None)


def argsort_ids(ids_S: Tensor, num_values: int) -> Tensor:
    """``torch.argsort(ids_S, stable=True)`` for ids in [0, num_values): LSD radix sort, O(S) per
    11 bits of ``num_values``. Check :func:`argsort_ids_available` first."""
    lib = _library()
    if lib is None:
        raise ValueError("argsort_ids needs the native library")
    order_S = torch.empty_like(ids_S)
    scratch_S = torch.empty_like(ids_S)
    bits = max(1, (num_values - 1).bit_length())
    status = lib.peer_argsort_ids(ids_S.data_ptr(), ids_S.numel(), bits, order_S.data_ptr(), scratch_S.data_ptr())
    if status == -1:
        raise ValueError(f"argsort_ids: an id is outside [0, {num_values})")
    if status != 0:
        raise MemoryError("argsort_ids: no memory for the radix counts")
    return order_S


def gather_dot(rows_TD: Tensor, table_ND: Tensor, sorted_ids_P: Tensor, row_P: Tensor, slot_P: Tensor) -> Tensor:
    """out[slot_P[p]] = table[sorted_ids_P[p]] . rows[row_P[p]], shape (P,) in slot order.

    ``slot_P`` is a permutation of the P slots; the pairs are visited in the given (expert)
    order. Not differentiable. Check :func:`expert_order_available` first.
    """
    lib = _library()
    if lib is None:
        raise ValueError("gather_dot needs the native library")
    out_S = torch.empty(slot_P.numel(), dtype=torch.float32)
    width = rows_TD.shape[1]
    ptrs = (rows_TD.data_ptr(), table_ND.data_ptr(), sorted_ids_P.data_ptr(), row_P.data_ptr(), slot_P.data_ptr())
    _over_rows(lambda begin, end, threads: lib.peer_gather_dot_f32(*ptrs, width, out_S.data_ptr(), begin, end,
                                                                    threads),
               slot_P.numel(), width)
    return out_S


def expert_order_available(*tensors: Tensor) -> bool:
    """Whether :func:`gather_dot` runs natively on these operands: contiguous fp32 CPU tensors."""
    return (enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                              for t in tensors) and _library() is not None)



def segment_sum(rows_TD: Tensor, weights_S: Tensor, row_P: Tensor, slot_P: Tensor, group_start_U: Tensor,
                out_UD: Tensor | None = None) -> Tensor:
    """out[u] = sum over the pairs p of group u of weights[slot_P[p]] * rows[row_P[p]], (U, D) fp32.

    Group u holds the expert-sorted positions [group_start_U[u], group_start_U[u + 1]). Written
    into ``out_UD`` when given (a reused buffer: a fresh (U, D) allocation costs more than the
    sums on a CPU, in page faults). Not differentiable. Check :func:`expert_order_available`.
    """
    lib = _library()
    if lib is None:
        raise ValueError("segment_sum needs the native library")
    num_groups, width, num_pairs = group_start_U.numel(), rows_TD.shape[1], row_P.numel()
    if out_UD is None:
        out_UD = torch.empty(num_groups, width, dtype=torch.float32)
    ptrs = (rows_TD.data_ptr(), row_P.data_ptr(), slot_P.data_ptr(), weights_S.data_ptr(), group_start_U.data_ptr())
    _over_rows(lambda begin, end, threads: lib.peer_segment_sum_f32(*ptrs, num_groups, num_pairs, width,
                                                                    out_UD.data_ptr(), begin, end, threads),
               num_groups, max(1, num_pairs // max(num_groups, 1)) * width)
    return out_UD
