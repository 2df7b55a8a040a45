"""Batches from grain worker processes (``workers > 0``) through ``shm_batches``' reused shared-memory blocks: the
batches of the in-process pipeline, the consumer's own memory however long it holds them, a few blocks per worker,
and no name left in /dev/shm once the iterator is closed, the trainer killed, or the trainer and its workers killed
together."""

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from matpac_jax.data import shm_batches
from matpac_jax.data.pipeline import pretrain_dataset
from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard

pytestmark = pytest.mark.skipif(not os.path.isdir(shm_batches.SHM_DIR), reason="blocks are found through /dev/shm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP, BATCH = 2000, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    records = [encode_record(ClipRecord(f"c{i}", rng.uniform(-0.9, 0.9, CROP + 50 * i))) for i in range(40)]
    for s in range(2):
        write_shard(shard_name(d, s, 2), records[s::2])
    return str(d / "*.arrayrecord")


def _ds(files, **kw):
    args = dict(global_batch=BATCH, crop_samples=CROP, seed=5, process_index=0, process_count=1)
    return pretrain_dataset(files, **(args | kw))


def _blocks(pids) -> list[str]:
    """The shared-memory blocks in /dev/shm that the processes ``pids`` created."""
    prefixes = tuple(f"{shm_batches.PREFIX}_{pid}_" for pid in pids)
    return [name for name in os.listdir(shm_batches.SHM_DIR) if name.startswith(prefixes)]


def _wait_until_gone(pids, seconds: float = 60) -> list[str]:
    """The blocks of ``pids`` still there after waiting up to ``seconds`` (a bound for a loaded machine)."""
    deadline = time.monotonic() + seconds
    while _blocks(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _blocks(pids)


def test_worker_batches_are_the_in_process_batches_of_each_workers_slice(shards):
    """grain gives worker w the elements w, w + W, ... and takes one batch from each worker in turn: batch k is batch
    k // W of the in-process pipeline over worker k % W's slice (the process split of W processes, same crops)."""
    workers, n = 2, 10
    it = iter(_ds(shards, workers=workers))
    got = [next(it) for _ in range(n)]  # all held: later batches must not change earlier ones
    it.close()
    slices = [iter(_ds(shards, global_batch=BATCH * workers, process_index=w, process_count=workers)) for w in (0, 1)]
    expected = [next(slices[k % workers]) for k in range(n)]
    for batch, want in zip(got, expected, strict=True):
        assert batch.keys() == want.keys()
        assert batch["audio"].dtype == np.int16 and np.array_equal(batch["audio"], want["audio"])


def test_a_held_batch_is_the_consumers_own_memory(shards):
    it = iter(_ds(shards, workers=1, prefetch_buffer=2))
    held = next(it)
    snapshot = held["audio"].copy()
    for _ in range(12):  # more batches than the worker has blocks: every block is refilled meanwhile
        next(it)
    it.close()
    assert held["audio"].flags.owndata  # a copy out of the block, not a view into shared memory
    assert np.array_equal(held["audio"], snapshot)


def _opened_blocks(pid: int) -> set[str]:
    """The blocks of worker ``pid`` this process holds open (their names already unlinked), from /proc/self/fd."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if target.startswith(f"{shm_batches.PREFIX}_{pid}_"):
            found.add(target.split()[0])
    return found


def test_a_worker_reuses_a_few_blocks(shards):
    """At most grain's per-worker buffer plus two blocks are in flight (queued, being copied out, being filled)."""
    it = iter(_ds(shards, workers=1, prefetch_buffer=2))
    for _ in range(20):
        next(it)
    (pid,) = [p.pid for p in multiprocessing.active_children()]
    used = _opened_blocks(pid)
    it.close()
    assert 1 <= len(used) <= 2 + 2


def test_no_blocks_left_after_the_iterator_is_closed(shards):
    it = iter(_ds(shards, workers=2))
    for _ in range(4):
        next(it)
    pids = [p.pid for p in multiprocessing.active_children()]
    it.close()
    assert not _wait_until_gone(pids)


_TRAINER = """
import multiprocessing, os, sys, time
from absl import flags
from matpac_jax.data.pipeline import pretrain_dataset
flags.FLAGS.mark_as_parsed()  # as absl's app.run does in the trainer: grain's worker prefetch reads absl flags
ds = pretrain_dataset(sys.argv[1], global_batch=8, crop_samples=2000, seed=0, process_index=0, process_count=1,
                      workers=2)
it = iter(ds)
next(it)
prefixes = tuple(f"matpac_batch_{p.pid}_" for p in multiprocessing.active_children())
for _ in range(100):  # until every block of the grown pools was received once (its name unlinked)
    next(it)
    time.sleep(0.2)  # the workers fill grain's queues meanwhile, growing their pools to full size
    if not any(name.startswith(prefixes) for name in os.listdir("/dev/shm")):
        break
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
sys.stdin.read()
"""


def _killed_trainer(shards, *, group: bool) -> list[int]:
    """Run the trainer above, SIGKILL it (``group``: with its workers and resource tracker); its workers' pids."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, shards],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]
    finally:
        os.killpg(trainer.pid, signal.SIGKILL) if group else trainer.kill()
        trainer.wait()
    assert len(pids) == 2
    return pids


def test_no_blocks_left_after_the_trainer_is_killed(shards):
    """Workers end with a killed trainer; multiprocessing's resource tracker unlinks any name they left."""
    assert not _wait_until_gone(_killed_trainer(shards, group=False))


def test_no_blocks_left_after_the_trainer_and_its_workers_are_killed_together(shards):
    """A scheduler's SIGKILL to the process group leaves nobody to clean up: a block's name is gone from its first
    batch on (tmpfs then frees it with the last process that maps it)."""
    pids = _killed_trainer(shards, group=True)
    assert not _blocks(pids)


def test_a_block_is_refilled_only_after_its_batch_was_copied_out(monkeypatch):
    pool = shm_batches._Pool()
    monkeypatch.setattr(shm_batches, "_pool", pool)
    batch_fn = shm_batches.PooledBatch()
    elements = [
        [{"audio": np.full(5, 10 * b + i, np.int16), "targets": np.full(3, b + i / 4, np.float32)} for i in range(3)]
        for b in range(3)
    ]
    first, second = batch_fn(elements[0]), batch_fn(elements[1])
    assert first.name != second.name  # the first batch is not copied out yet: its block stays untouched
    copied = pickle.loads(pickle.dumps(first))  # what grain's queue does: the main process copies it out
    assert first.name not in os.listdir(shm_batches.SHM_DIR)  # its name is unlinked at its first batch
    third = batch_fn(elements[2])
    assert third.name == first.name  # copied out: its block is reused
    batches = [copied, *(pickle.loads(pickle.dumps(handle)) for handle in (second, third))]
    for batch, group in zip(batches, elements, strict=True):
        for key in ("audio", "targets"):
            want = np.stack([e[key] for e in group])
            assert batch[key].dtype == want.dtype and np.array_equal(batch[key], want)
    pool.close()


def test_a_worker_that_exits_unlinks_the_blocks_never_received(monkeypatch):
    pool = shm_batches._Pool()
    monkeypatch.setattr(shm_batches, "_pool", pool)
    sent = shm_batches.PooledBatch()([{"audio": np.zeros(4, np.int16)}])
    assert sent.name in os.listdir(shm_batches.SHM_DIR)
    pool.close()  # what the worker's exit runs
    assert sent.name not in os.listdir(shm_batches.SHM_DIR)
    assert pickle.loads(pickle.dumps(sent)) is None  # only a closing iterator, draining grain's queue, sees this
