"""Two-lane sha256 (dynamo_mega/convert/_sha256_lanes.c) against hashlib: every split of the input, every mix of
one-stream and paired updates, lengths around the 64-byte block and the 56-byte padding boundary."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from dynamo_mega.convert import sha256_lanes

lanes = sha256_lanes._sha256_lanes


def test_extension_is_built_where_the_cpu_can_use_it():
    """setup.py builds it (optional, so that a machine without a compiler still installs); on this project's
    machines a missing build would silently halve the manifest hashing speed."""
    assert lanes is not None, "dynamo_mega/convert/_sha256_lanes.c is not built: run `pip install -e .` (needs a C compiler)"
    if not lanes.accelerated():
        pytest.skip("this CPU has no x86 SHA extensions: hashlib is used")
    assert sha256_lanes.PAIRED


needs_lanes = pytest.mark.skipif(not sha256_lanes.PAIRED, reason="the extension is not built or the CPU lacks SHA extensions")

EDGE_LENGTHS = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4096, 70_001]


@needs_lanes
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_one_stream_matches_hashlib(length):
    data = random.Random(length).randbytes(length)
    ours = lanes.Sha256()
    ours.update(data)
    assert ours.hexdigest() == hashlib.sha256(data).hexdigest()
    assert ours.digest() == hashlib.sha256(data).digest()
    ours.update(b"more")  # a digest does not end the stream
    assert ours.hexdigest() == hashlib.sha256(data + b"more").hexdigest()


@needs_lanes
def test_paired_updates_in_any_mix_match_hashlib():
    rng = random.Random(0)
    for trial in range(200):
        a, b = lanes.Sha256(), lanes.Sha256()
        ref_a, ref_b = hashlib.sha256(), hashlib.sha256()
        for _ in range(rng.randint(1, 6)):
            data_a = rng.randbytes(rng.choice(EDGE_LENGTHS + [rng.randint(0, 9000)]))
            data_b = rng.randbytes(rng.choice(EDGE_LENGTHS + [rng.randint(0, 9000)]))
            if rng.random() < 0.7:
                lanes.update_pair(a, data_a, b, memoryview(data_b))  # any buffer
            else:
                a.update(data_a)
                b.update(bytearray(data_b))
            ref_a.update(data_a)
            ref_b.update(data_b)
        assert (a.hexdigest(), b.hexdigest()) == (ref_a.hexdigest(), ref_b.hexdigest()), f"trial {trial}"


@needs_lanes
def test_large_equal_pairs_match_hashlib():
    """The fast path: equal whole-block lengths, megabytes, from mapped-file-like memoryview slices."""
    rng = random.Random(1)
    x, y = rng.randbytes(3 << 20), rng.randbytes(3 << 20)
    a, b = lanes.Sha256(), lanes.Sha256()
    for at in range(0, len(x), 1 << 20):
        lanes.update_pair(a, memoryview(x)[at : at + (1 << 20)], b, memoryview(y)[at : at + (1 << 20)])
    assert a.hexdigest() == hashlib.sha256(x).hexdigest()
    assert b.hexdigest() == hashlib.sha256(y).hexdigest()


@needs_lanes
def test_misuse_is_refused():
    a = lanes.Sha256()
    with pytest.raises(ValueError, match="two different"):
        lanes.update_pair(a, b"x", a, b"y")
    with pytest.raises(TypeError, match="encoded"):
        a.update("text")
    with pytest.raises(TypeError, match="Sha256 objects"):
        lanes.update_pair(a, b"x", hashlib.sha256(), b"y")
    assert (a.name, a.digest_size, a.block_size) == ("sha256", 32, 64)


@needs_lanes
def test_one_object_updated_from_two_threads_raises_instead_of_corrupting():
    a, big = lanes.Sha256(), bytes(256 << 20)  # ~0.2 s of hashing with the GIL released
    errors = []

    def update(data):
        try:
            a.update(data)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=update, args=(big,))
    thread.start()
    while thread.is_alive() and not errors:  # whichever thread comes second is refused
        update(b"x")
    thread.join()
    assert errors and "another thread" in errors[0]
    thread = threading.Thread(target=a.update, args=(big,))
    thread.start()
    refused = []
    while thread.is_alive() and not refused:  # nor can a digest read the state meanwhile
        try:
            a.hexdigest()
        except RuntimeError:
            refused.append(True)
    thread.join()
    assert refused


def test_fallback_gives_the_same_digests(monkeypatch):
    """Without the extension (or SHA extensions), new_sha256 / update_pair are hashlib, one stream at a time."""
    monkeypatch.setattr(sha256_lanes, "PAIRED", False)
    a, b = sha256_lanes.new_sha256(), sha256_lanes.new_sha256()
    sha256_lanes.update_pair(a, b"abc", b, b"")
    assert a.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example
    assert b.hexdigest() == hashlib.sha256(b"").hexdigest()
