"""The synthetic source: the same global batches whatever the number of processes."""

import itertools

import numpy as np
import pytest

from recam_jax.synthetic import synthetic_dataset

SHAPES = dict(latent_shape=(2, 4, 4, 3), text_len=5, text_dim=6, seed=3)


def first_batches(count: int, **kwargs) -> list[dict]:
    return list(itertools.islice(synthetic_dataset(**SHAPES, **kwargs), count))


@pytest.mark.parametrize("for_eval", [False, True])
def test_hosts_together_yield_the_single_host_global_batches(for_eval):
    # 10 examples, global batch 4: an eval pass is 2 batches, training crosses into the 2nd epoch.
    count = 2 if for_eval else 5
    single = first_batches(count, num_examples=10, batch_size=4, for_eval=for_eval)
    hosts = [first_batches(count, num_examples=10, batch_size=2, for_eval=for_eval, process_index=p,
                           process_count=2) for p in range(2)]
    assert len(single) == len(hosts[0]) == len(hosts[1]) == count
    for step in range(count):
        for key, value in single[step].items():
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][key], hosts[1][step][key]]), value)
        assert not np.array_equal(hosts[0][step]["source_latents"], hosts[1][step]["source_latents"])
