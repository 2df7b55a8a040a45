"""Length buckets shared by the loaded models (inference.Encoder, models.student.Student): a few compiled programs
serve every clip length, and ``TRACES`` counts the programs each traced (one per compile)."""

from __future__ import annotations

import collections

MIN_FRAME_BUCKET = 64  # log-mel frame buckets: 64, 80, 96, 112, 128, 160, ... (four per octave)
MEL_BATCH_SAMPLES = 1 << 22  # waveform samples per log-mel call (bounds its device memory), at least one clip
TRACES: collections.Counter = collections.Counter()  # 'log_mel' / 'encoder' -> programs traced (one per compile)


def bucket(n: int, steps_per_octave: int = 1) -> int:
    """Smallest ``m · 2^e >= n`` with ``steps_per_octave <= m < 2 · steps_per_octave`` (a power of two): powers of two
    for 1, four sizes per octave (at most 25 % above ``n``) for 4; values up to ``2 · steps_per_octave`` are exact."""
    shift = max(0, n.bit_length() - steps_per_octave.bit_length())
    return -(-n // (1 << shift)) << shift
