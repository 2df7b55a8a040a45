"""Input ahead of the device: host batches become global device arrays ``size`` batches before the step needs them.

The trainer takes a batch (``next``), dispatches the step (asynchronous) and then calls ``fill()``, which reads and
transfers the following batches while the device computes; the next ``next`` finds them ready, so the measured data
wait is only what the host could not hide.

Checkpoints stay exact: the wrapped iterator has already produced the buffered batches, so ``get_state`` returns the
state recorded *before* the oldest batch not yet handed out (JSON bytes, the form grain's checkpoint handler stores
for iterators other than its own, readable by a plain grain iterator's ``set_state`` at restore).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax

from matpac_jax import parallel


class DevicePrefetch:
    def __init__(self, iterator: Any, mesh: jax.sharding.Mesh, size: int = 2):
        self.iterator, self.mesh, self.size = iterator, mesh, max(int(size), 1)
        self.stateful = hasattr(iterator, "get_state")
        self.buffer: collections.deque = collections.deque()  # (state before the batch, device batch)

    def __iter__(self) -> DevicePrefetch:
        return self

    def fill(self) -> None:
        """Read and transfer batches until ``size`` are buffered."""
        while len(self.buffer) < self.size:
            state = self.iterator.get_state() if self.stateful else None
            self.buffer.append((state, parallel.global_batch(next(self.iterator), self.mesh)))

    def __next__(self) -> dict:
        if not self.buffer:
            self.fill()
        return self.buffer.popleft()[1]

    def peek(self) -> dict:
        """The next device batch, left in the buffer (``fill`` first)."""
        return self.buffer[0][1]

    def get_state(self) -> bytes:
        state = self.buffer[0][0] if self.buffer else self.iterator.get_state()
        return json.dumps(state, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.buffer.clear()
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after set_state
        pass

    def close(self) -> None:
        if hasattr(self.iterator, "close"):
            self.iterator.close()
