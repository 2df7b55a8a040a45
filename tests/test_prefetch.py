"""Device prefetch: batches in order as global arrays, the checkpointed state is the one before the oldest batch not
yet handed out, and restoring it continues with exactly the next batch."""

import json

import jax
import numpy as np

from matpac_jax import parallel
from matpac_jax.train.prefetch import DevicePrefetch


class Counter:
    """A stateful iterator like grain's: batch i holds the value i."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"audio": np.full((8, 3), self.i - 1, np.int16)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_prefetch_order_state_and_restore():
    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    pf = DevicePrefetch(Counter(), mesh, size=3)
    first = next(pf)
    assert isinstance(first["audio"], jax.Array) and first["audio"].sharding.spec[0] in ("data", ("data",))
    assert int(first["audio"][0, 0]) == 0
    pf.fill()  # reads ahead: batches 1, 2, 3 are buffered, the counter is at 4
    assert pf.iterator.i == 4 and len(pf.buffer) == 3
    assert json.loads(pf.get_state()) == {"i": 1}  # resume at batch 1, the next one the trainer would take
    assert [int(next(pf)["audio"][0, 0]) for _ in range(2)] == [1, 2]
    saved = pf.get_state()
    again = DevicePrefetch(Counter(), mesh, size=2)
    again.set_state(saved)
    assert [int(next(again)["audio"][0, 0]) for _ in range(3)] == [3, 4, 5]
    assert not DevicePrefetch(iter([]), mesh).stateful
