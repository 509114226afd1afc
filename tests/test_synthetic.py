"""The synthetic source: the same global batches whatever the number of processes."""

import itertools

import numpy as np
import pytest

from recam_jax.synthetic import synthetic_dataset

SHAPES = dict(latent_shape=(2, 4, 4, 3), text_len=5, text_dim=6, seed=3)


def first_batches(count: int, **kwargs) -> list[dict]:
    return list(itertools.islice(synthetic_dataset(**SHAPES, **kwargs), count))


@pytest.mark.parametrize("for_eval", [False, True])
@pytest.mark.parametrize("host_rows", [([0, 1], [2, 3]), ([1, 3], [0, 2]), ([0, 1, 2, 3], [0, 1, 2, 3])],
                         ids=["halves", "interleaved", "replicated"])
def test_each_host_gets_its_rows_of_the_single_host_global_batches(for_eval, host_rows):
    # 10 examples, global batch 4: an eval pass is 3 batches (the last padded), training crosses into the 2nd epoch.
    count = 3 if for_eval else 5
    single = first_batches(count, num_examples=10, batch_size=4, for_eval=for_eval)
    hosts = [first_batches(count, num_examples=10, batch_size=4, for_eval=for_eval, rows=rows) for rows in host_rows]
    assert len(single) == len(hosts[0]) == len(hosts[1]) == count
    for step in range(count):
        for rows, host in zip(host_rows, hosts):
            for key, value in single[step].items():
                np.testing.assert_array_equal(host[step][key], value[rows])


def test_an_eval_pass_counts_every_held_out_example_once():
    """10 held-out examples in batches of 4: 3 batches, the last with 2 weight-0 rows (none dropped)."""
    batches = first_batches(10, num_examples=10, batch_size=4, for_eval=True)
    assert [list(b["eval_weight"]) for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    seeds = np.concatenate([b["noise_seed"][b["eval_weight"] > 0] for b in batches])
    assert sorted(seeds) == list(range(10))
