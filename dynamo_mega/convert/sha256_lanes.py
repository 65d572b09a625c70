"""sha256 of two byte streams at once on one core, or of one at a time where that is not possible.

One sha256 stream cannot keep a core's SHA unit busy: each instruction waits for the previous one's result.
The C extension (_sha256_lanes.c) interleaves two streams' rounds; on this project's hosts (AMD EPYC, Zen 2)
that hashes 2.0 GB/s per core where one stream (OpenSSL's, or the extension's own) hashes 1.2 GB/s. The
digests are ordinary sha256 digests (tests compare them with hashlib's).

Where the extension did not build (no C compiler at install) or the CPU has no SHA extensions (x86 before
Ice Lake / Zen, other architectures), `PAIRED` is False and everything here is hashlib, one stream after the
other: same digests, slower.
"""

from __future__ import annotations

import hashlib

try:
    from dynamo_mega.convert import _sha256_lanes
except ImportError:  # not built: setup.py marks the extension optional
    _sha256_lanes = None

PAIRED: bool = _sha256_lanes is not None and _sha256_lanes.accelerated()


def new_sha256():
    """An empty sha256 object (update / digest / hexdigest, like hashlib's) that `update_pair` can take."""
    return _sha256_lanes.Sha256() if PAIRED else hashlib.sha256()


def update_pair(a, data_a, b, data_b) -> None:
    """a.update(data_a); b.update(data_b), for objects from `new_sha256` (the GIL is released meanwhile). With
    `PAIRED`, as many whole 64-byte blocks as both data have are hashed side by side, the rest one stream at a
    time: pairs of equal length, multiples of 64 bytes, are all side by side."""
    if PAIRED:
        _sha256_lanes.update_pair(a, data_a, b, data_b)
    else:
        a.update(data_a)
        b.update(data_b)
