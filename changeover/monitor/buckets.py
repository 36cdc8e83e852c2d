"""The latency histogram's buckets, shared by the recorder, the route book and the baseline."""

from __future__ import annotations

# Latency buckets: 4 per octave from 0.1 ms to ~62 s (78 upper bounds + one overflow bucket).
# A 19 % bucket width keeps interpolated percentiles within a few % of the truth, far finer
# than the 1.5x latency trigger, at a cost of ~80 ints per slot-second.
BUCKETS_PER_OCTAVE = 4
MIN_LATENCY = 1e-4
BOUNDS: tuple[float, ...] = tuple(MIN_LATENCY * 2 ** (k / BUCKETS_PER_OCTAVE) for k in range(78))
NBUCKETS = len(BOUNDS) + 1
