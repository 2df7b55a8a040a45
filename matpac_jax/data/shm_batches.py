"""Batches from grain worker processes through a few reused shared-memory blocks per worker, not a fresh one per batch.

Why: grain's ``mp_prefetch`` sends each batch in a shared-memory block it allocates for that batch, and the main
process unlinks it once the batch is freed. Every batch therefore writes into never-touched pages, and faulting them
in cost 0.14–0.34 CPU-ms per crop (one 6.2 MB int16 batch of 32 crops: 5–11 ms against 0.2–0.6 ms into a touched
buffer; ``bench/input_pipeline.py`` (d), 2-core VM with shmem transparent huge pages off): most of what worker
processes cost over the in-process pipeline. Here each worker stacks a batch into one of its own blocks, whose pages
stay touched from batch to batch, and the main process copies the batch out when it takes it off grain's queue
(0.46 ms per 6.2 MB batch, ~0.015 CPU-ms per crop). Measured: 0.50 -> 0.35 CPU-ms per crop with 1 worker, 0.56 -> 0.40
with 2, in-process 0.29 (BENCHMARKS.md, "Input pipeline").

Protocol (``PooledBatch`` in a worker, ``receive`` in the main process):

1. The worker picks a block of its pool whose state word (the first 8 bytes) is FREE, or creates one; it stacks the
   batch's arrays into it, sets the state to SENT and hands grain a ``_Sent`` handle (the block's name and the arrays'
   layout) instead of arrays, which grain pickles through its queue as is.
2. Unpickling the handle in the main process (inside grain's queue ``get``) calls ``receive``: it locks the block
   (``flock``), copies the arrays out into ordinary memory, sets the state to FREE and unlocks. The batch a consumer
   gets is that private copy: no later batch can ever change it, however long it is held (``DevicePrefetch`` keeps
   several while they transfer to the device).
3. The worker only reuses a block it finds FREE while holding the same lock, so the copy of step 2 happens-before
   any refill on any architecture (a kernel lock's release and acquire), not only on x86's ordered stores. A block
   never found FREE is never reused: the pool grows instead (to grain's per-worker buffer plus one or two blocks).

Names: the main process opens a block and unlinks its name at the block's first batch, then keeps the descriptor
(closed once its worker has exited, when a new block is opened: a closed iterator's blocks stay allocated until the
next pool's first block or the process's end). From then on the block is memory of the processes that map it and goes
with them however they end, even all killed at once (a scheduler's SIGKILL to the process group, resource tracker
included). Before its first batch is received, a block's name is unlinked by the worker when it exits cleanly, or by
multiprocessing's resource tracker (the worker registers it) once the trainer and workers are gone; only a SIGKILL of
all of them together, tracker included, leaves such a name (1 block 6 batches into a run, against 10–12 of grain's
per-batch blocks). A handle whose block is already gone (its worker stopped cleanly while grain drained the queue on
shutdown) becomes None, which only a closing iterator sees.

Only in processes where ``enable_pool`` ran (``pipeline.worker_init`` calls it in each grain worker); elsewhere
``PooledBatch`` stacks into ordinary arrays, so the in-process pipeline and the batches are unchanged. Linux: the main
process opens blocks through ``/dev/shm`` (without it, batches go through grain's own per-batch shared memory).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import threading
from multiprocessing import resource_tracker, util

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "matpac_batch"  # block names: matpac_batch_<worker pid>_<random hex>
HEADER = 64  # bytes before the first array: the state word, and 64-byte alignment for the arrays
FREE, SENT = 0, 1
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map the block's pages in one call instead of one fault per page

_pool: _Pool | None = None


def enable_pool() -> None:
    """In a grain worker process: send ``PooledBatch`` batches through this process's pool of reused blocks."""
    global _pool
    if _pool is None and os.path.isdir(SHM_DIR):
        _pool = _Pool()


class _Block:
    """One block of a worker's pool: a file in /dev/shm, mapped once, with its own descriptor to ``flock``."""

    def __init__(self, nbytes: int):
        self.name, self.size = f"{PREFIX}_{os.getpid()}_{secrets.token_hex(8)}", nbytes
        self.fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self.fd, nbytes)
        self.buf = mmap.mmap(self.fd, nbytes)
        self.state = np.ndarray((), np.uint64, buffer=self.buf)
        resource_tracker.register(f"/{self.name}", "shared_memory")  # unlinks it if everything dies before `receive`
        self.tracked = True

    def claim(self) -> bool:
        """Whether the main process has copied this block's last batch out (FREE); if so, it is the worker's again."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the main process is copying it out right now
            return False
        try:
            free = int(self.state) == FREE
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        if free and self.tracked:  # received once: the main process has unlinked its name
            resource_tracker.unregister(f"/{self.name}", "shared_memory")
            self.tracked = False
        return free

    def close(self) -> None:
        del self.state  # an exported view would keep the mapping open
        self.buf.close()
        os.close(self.fd)
        if self.tracked:
            resource_tracker.unregister(f"/{self.name}", "shared_memory")
        try:  # a block never received still has its name
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


class _Pool:
    """A worker's blocks; closed when the worker exits."""

    def __init__(self):
        self.blocks: list[_Block] = []
        util.Finalize(self, self.close, exitpriority=0)

    def take(self, nbytes: int) -> _Block:
        for block in self.blocks:
            if block.size >= nbytes and block.claim():
                return block
        self.blocks.append(_Block(nbytes))
        return self.blocks[-1]

    def close(self) -> None:
        for block in self.blocks:
            block.close()
        self.blocks = []


class _Sent:
    """What a worker hands grain for a batch: pickles as a call of ``receive`` with the block and its layout."""

    def __init__(self, name: str, layout: tuple):
        self.name, self.layout = name, layout

    def __reduce__(self):
        return receive, (self.name, self.layout)


_opened: dict[str, tuple[int, int]] = {}  # in the main process: block name -> (descriptor, worker pid)
_opened_lock = threading.Lock()  # grain receives from each worker in its own thread


def _descriptor(name: str) -> int | None:
    """A new descriptor of block ``name`` for one ``receive`` (a duplicate: closing the cached one cannot pull it from
    under a copy), or None if the block is gone. The first call opens the block and unlinks its name, so that no name
    outlives the processes even when all are killed at once; opening a new block closes those of exited workers."""
    with _opened_lock:
        if name not in _opened:
            path = os.path.join(SHM_DIR, name)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                return None
            try:
                os.unlink(path)
            except FileNotFoundError:  # its worker is unlinking it on exit: the block itself is still readable
                pass
            for other, (other_fd, pid) in list(_opened.items()):
                try:
                    os.kill(pid, 0)
                except (ProcessLookupError, PermissionError):  # gone, or its pid is another user's process now
                    os.close(other_fd)
                    del _opened[other]
            _opened[name] = fd, int(name.split("_")[-2])
        return os.dup(_opened[name][0])


def receive(name: str, layout: tuple) -> dict | None:
    """The batch in block ``name`` as ordinary arrays (``layout``: (key, shape, dtype, offset) per array); the block
    is FREE again on return. None if the block is gone (its worker stopped: only while an iterator shuts down)."""
    fd = _descriptor(name)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        buf = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | _POPULATE)
        batch = {key: np.ndarray(shape, dtype, buffer=buf, offset=at).copy() for key, shape, dtype, at in layout}
        state = np.ndarray((), np.uint64, buffer=buf)
        state[...] = FREE
        del state
        buf.close()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the cached descriptor shares the duplicate's lock
        os.close(fd)
    return batch


class PooledBatch:
    """grain ``batch`` function: element dicts of arrays -> a dict of stacked arrays (``np.stack`` per key, as grain's
    default), sent through the worker's pool where ``enable_pool`` ran."""

    def __call__(self, elements: list[dict]) -> dict | _Sent:
        if _pool is None:
            return {key: np.stack([e[key] for e in elements]) for key in elements[0]}
        layout, nbytes = [], HEADER
        for key, first in elements[0].items():
            first = np.asarray(first)
            shape = (len(elements), *first.shape)
            layout.append((key, shape, first.dtype.str, nbytes))
            nbytes += -(-first.nbytes * len(elements) // 64) * 64
        block = _pool.take(nbytes)
        for key, shape, dtype, at in layout:
            np.stack([e[key] for e in elements], out=np.ndarray(shape, dtype, buffer=block.buf, offset=at))
        block.state[...] = SENT
        return _Sent(block.name, tuple(layout))
