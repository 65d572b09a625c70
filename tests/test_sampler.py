"""EpochSampler: no prompt twice in a batch at any epoch boundary, every epoch visits each prompt once,
order a pure function of (seed, cursor), resume exact at every step."""

from collections import Counter

import numpy as np
import pytest

from dynamo_mega.data import EpochSampler


def _old_sampler_batch(num_items: int, seed: int, batch_size: int, step: int) -> list[int]:
    """The pre-fix rule (fill a crossing batch straight from the next shuffle), as a witness that the cases
    below are the ones that crashed runs."""
    stream = np.concatenate(
        [np.random.default_rng([seed, e]).permutation(num_items) for e in range(step * batch_size // num_items + 2)]
    )
    return stream[(step - 1) * batch_size : step * batch_size].tolist()


@pytest.mark.parametrize(
    "num_items, seed, batch_size, step",
    [
        (3500, 3, 64, 55),  # configs/tiny_cpu.yaml run.seed=3 stopped at RL step 55
        (7470, 42, 512, 15),  # the paper recipes: MATH train (7,470 rows), 512 prompts per step, step 15
        (7470, 0, 512, 15),
    ],
)
def test_crossing_batch_holds_distinct_prompts(num_items, seed, batch_size, step):
    old = _old_sampler_batch(num_items, seed, batch_size, step)
    assert len(set(old)) < len(old)  # the old rule repeated a prompt in exactly this batch
    sampler = EpochSampler(num_items, seed)
    for _ in range(step - 1):
        sampler.next_batch(batch_size)
    batch = sampler.next_batch(batch_size)
    assert len(set(batch)) == batch_size
    assert sampler.epoch == 1


@pytest.mark.parametrize("num_items, batch_size", [(3500, 64), (7470, 512), (10, 4), (10, 10), (7, 3), (5, 5)])
def test_every_batch_distinct_and_every_epoch_complete(num_items, batch_size):
    sampler = EpochSampler(num_items, seed=5)
    epochs = 4
    steps = epochs * num_items // batch_size
    stream = []
    for _ in range(steps):
        batch = sampler.next_batch(batch_size)
        assert len(set(batch)) == batch_size
        stream.extend(batch)
    # The stream is epoch after epoch: each run of num_items consecutive draws is one whole epoch.
    for e in range(len(stream) // num_items):
        assert Counter(stream[e * num_items : (e + 1) * num_items]) == Counter(range(num_items))


def test_sampler_resume_exact_at_every_step():
    reference = EpochSampler(37, seed=9)
    batches = [reference.next_batch(8) for _ in range(20)]
    probe = EpochSampler(37, seed=9)
    for k in range(20):
        resumed = EpochSampler(37, seed=9)
        resumed.load_state_dict(probe.state_dict())
        assert [resumed.next_batch(8) for _ in range(20 - k)] == batches[k:]
        probe.next_batch(8)


def test_sampler_state_without_carry_still_loads():
    """Checkpoints written before the fix have no carry: they load and go on from their cursor."""
    s = EpochSampler(10, seed=1)
    s.load_state_dict({"epoch": 2, "position": 4, "seed": 1, "num_items": 10})
    assert len(set(s.next_batch(8))) == 8


def test_batch_larger_than_dataset_is_a_user_error():
    with pytest.raises(ValueError, match="prompts_per_step"):
        EpochSampler(5, seed=0).next_batch(6)
