"""``torch.distributed`` plumbing: one code path for one process and for ``torchrun``.

A stage calls :func:`session` (or :func:`init` / :func:`destroy`) once. Started
by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), the process joins the process group with
``init_method="env://"``; started by hand, or with ``WORLD_SIZE=1``, nothing is
initialized and every helper below degrades to its one-process meaning, so the
stage has no separate single-process branch.

API
---
``Context``
    ``rank``, ``world_size``, ``local_rank``, ``backend`` (``None`` for one
    process), ``device`` (the device this rank computes on: ``cuda:LOCAL_RANK``
    under torchrun on GPUs, else the device asked for); ``is_main`` (rank 0:
    the only rank that writes outputs and logs progress), ``distributed``.
``check_device(device) -> str``
    ``device`` itself when this machine can compute on it (``cpu``, ``cuda`` or
    ``cuda:N`` with a visible GPU N), else an :class:`InputError` naming the
    ``--device`` option: what stages with a device option validate it with.
``init(device="cpu", backend=None, timeout=DEFAULT_TIMEOUT) -> Context``
    Backend ``nccl`` for a CUDA device, ``gloo`` for the CPU (``backend``
    overrides). On CUDA, selects ``cuda:LOCAL_RANK`` as the current device.
``destroy(ctx)``
    Leave the process group (no-op for one process).
``session(device="cpu", backend=None, timeout=DEFAULT_TIMEOUT)``
    Context manager: :func:`init` on entry, :func:`destroy` on exit.
``shard_range(n, rank, world_size) -> range``
    Contiguous share of ``n`` items, sizes differing by at most one.
``balanced_pieces(sizes, world_size) -> list[range]``
    Contiguous runs of indivisible pieces (batches), one run per rank, with
    about equal total size: for work whose unit must not be split.
``gather_rows(ctx, local, rows, n, out=None) -> ndarray | None``
    Assemble a 2-D array of ``n`` rows on rank 0 from every rank's ``local``
    rows (``local[j]`` is row ``rows[j]``); other ranks get ``None``. Sent
    point-to-point in chunks of :data:`CHUNK_BYTES`, so rank 0 needs the result
    (which may be a memory map passed as ``out``) plus one chunk, never all
    ranks' shards at once, and no file system shared between nodes.
``barrier(ctx)``, ``broadcast_object(ctx, obj, src=0)``
    The collectives with the same names, no-ops for one process.
``all_gather_object(ctx, obj) -> list``
    Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process).
``all_sum(ctx, values) -> list[float]``
    Element-wise sum of every rank's ``values`` (float64), on every rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mom.errors import InputError

DEFAULT_TIMEOUT = datetime.timedelta(hours=1)  # ranks wait for the slowest one at each gather
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(device: str) -> str:
    """``device`` when this machine can compute on it; else a one-line :class:`InputError`."""
    form = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if form is None:
        raise InputError(f"--device: must be cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise InputError(f"--device: {device} requested but no CUDA device is available; use cpu")
    count = torch.cuda.device_count()
    if int(form.group(1) or 0) >= count:
        raise InputError(f"--device: {device} requested but this machine has {count} CUDA device(s), "
                         f"cuda:0..cuda:{count - 1}")
    return device


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu", backend: str | None = None,
         timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Context:
    """Join torchrun's process group when launched by it, else the one-process context."""
    device = str(device)
    if not _launched_by_torchrun():
        return Context(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices here: "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = backend or ("nccl" if on_gpu else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return Context(rank, world_size, local_rank, backend, device)


def destroy(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "cpu", backend: str | None = None,
            timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Context]:
    ctx = init(device, backend, timeout)
    try:
        yield ctx
    finally:
        destroy(ctx)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Items ``rank`` handles out of ``n``: contiguous, the first ``n % world_size`` ranks one more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def balanced_pieces(sizes: Sequence[int], world_size: int) -> list[range]:
    """Split pieces ``0..len(sizes)-1`` into ``world_size`` contiguous runs of about equal total size.

    Piece i goes to the rank whose equal share of the total holds the piece's
    midpoint, so no rank is more than about one piece from its share.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:  # only empty pieces: spread them by count
        owners = np.arange(len(sizes)) * world_size // max(len(sizes), 1)
    else:
        midpoints2 = 2 * (np.cumsum(sizes) - sizes) + sizes  # twice the midpoint, integer
        owners = np.minimum(midpoints2 * world_size // (2 * total), world_size - 1)
    bounds = np.searchsorted(owners, np.arange(world_size + 1), side="left")
    return [range(int(bounds[r]), int(bounds[r + 1])) for r in range(world_size)]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier(device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)


def broadcast_object(ctx: Context, obj=None, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable; for small things: settings, seeds, tuple lists)."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=torch.device(ctx.device) if ctx.backend == "nccl" else None)
    return holder[0]


def all_gather_object(ctx: Context, obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def all_sum(ctx: Context, values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of ``values`` (same length on every rank)."""
    if not ctx.distributed:
        return [float(value) for value in values]
    total = torch.tensor([float(value) for value in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu().tolist()


def gather_rows(ctx: Context, local: np.ndarray, rows: Sequence[int], n: int,
                out: np.ndarray | None = None) -> np.ndarray | None:
    """The ``(n, d)`` array whose row ``rows[j]`` of rank r is ``local[j]`` of rank r, on rank 0.

    Every rank calls it with its own rows (disjoint, together covering what the
    caller wants filled; unlisted rows keep ``out``'s content, zeros without
    ``out``) and the same dtype and width ``d``. Other ranks return ``None``.
    """
    local = np.ascontiguousarray(local)
    rows = np.asarray(rows, dtype=np.int64)
    if local.ndim != 2 or len(local) != len(rows):
        raise ValueError(f"local must be 2-D with one row per entry of rows, got {local.shape} and {rows.shape}")
    if not ctx.distributed:
        if out is None and len(rows) == n and np.array_equal(rows, np.arange(n)):
            return local
        return _placed(out, n, local.shape[1], local.dtype, rows, local)

    sizes = _all_gather_sizes(ctx, len(local), local.shape[1])
    widths = {int(width) for count, width in sizes if count}
    if len(widths) > 1:
        raise ValueError(f"ranks hold rows of different widths {sorted(widths)}")
    width = widths.pop() if widths else local.shape[1]
    if not ctx.is_main:
        _send_rows(ctx, rows, local)
        return None
    result = _placed(out, n, width, local.dtype, rows, local)
    for source in range(1, ctx.world_size):
        _receive_rows(ctx, source, int(sizes[source][0]), result)
    return result


def _placed(out, n, width, dtype, rows, local):
    result = np.zeros((n, width), dtype=dtype) if out is None else out
    if result.shape != (n, width):
        raise ValueError(f"out must have shape {(n, width)}, got {result.shape}")
    result[rows] = local
    return result


def _all_gather_sizes(ctx: Context, count: int, width: int) -> np.ndarray:
    mine = torch.tensor([count, width], dtype=torch.int64, device=ctx.device)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return torch.stack(everyone).cpu().numpy()


def _chunk_rows(width: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, width * itemsize))


def _send_rows(ctx: Context, rows: np.ndarray, local: np.ndarray) -> None:
    if not len(rows):
        return
    dist.send(torch.from_numpy(rows).to(ctx.device), dst=0)
    step = _chunk_rows(local.shape[1], local.itemsize)
    for start in range(0, len(local), step):
        dist.send(torch.from_numpy(local[start:start + step]).to(ctx.device), dst=0)


def _receive_rows(ctx: Context, source: int, count: int, result: np.ndarray) -> None:
    if not count:
        return
    rows = torch.empty(count, dtype=torch.int64, device=ctx.device)
    dist.recv(rows, src=source)
    rows = rows.cpu().numpy()
    width = result.shape[1]
    step = _chunk_rows(width, result.itemsize)
    dtype = torch.from_numpy(np.empty(0, dtype=result.dtype)).dtype
    for start in range(0, count, step):
        chunk = torch.empty((min(step, count - start), width), dtype=dtype, device=ctx.device)
        dist.recv(chunk, src=source)
        result[rows[start:start + len(chunk)]] = chunk.cpu().numpy()
