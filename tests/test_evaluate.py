"""Camera sensitivity: the loss gap between true and shuffled cameras, in eval and from the CLI."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipeline import demo_data, loader
from recam_jax import convert, evaluate, flow
from recam_jax.models.dit import WanDiT, dit_config
from recam_jax.synthetic import synthetic_dataset


def tiny_model(camera_scale: float, **cfg) -> WanDiT:
    """The tiny DiT; `camera_scale` > 0 moves every camera encoder far from its zero init."""
    model = WanDiT(dit_config("tiny", **cfg), rngs=nnx.Rngs(0))
    kernel = model.blocks.cam_encoder.kernel  # (layers, 12, dim): the blocks are stacked
    kernel[...] = camera_scale * jax.random.normal(jax.random.key(1), kernel.shape)
    return model


def eval_batch():
    batches = synthetic_dataset(num_examples=4, batch_size=4, latent_shape=(2, 4, 4, 16), text_len=8, text_dim=32,
                                seed=0, for_eval=True)
    return {k: jax.numpy.asarray(v) for k, v in next(iter(batches)).items()}


def test_gap_is_zero_with_the_camera_encoder_at_its_zero_init():
    metrics = evaluate.camera_sensitivity(tiny_model(0.0), eval_batch(), flow.FlowConfig())
    assert float(metrics["eval_loss"]) > 0
    assert float(metrics["camera_gap"]) == 0.0


def test_gap_is_nonzero_when_the_model_reads_the_camera():
    batch = eval_batch()
    assert not np.allclose(batch["camera"][0], batch["camera"][1])  # shuffling changes what each example sees
    metrics = evaluate.camera_sensitivity(tiny_model(1.0), batch, flow.FlowConfig())
    assert abs(float(metrics["camera_gap"])) > 1e-3
    np.testing.assert_allclose(metrics["camera_gap"], metrics["eval_loss_shuffled_cameras"] - metrics["eval_loss"],
                               atol=1e-6)


def test_a_gaps_standard_error_is_that_of_the_per_example_gaps():
    """The standard error says whether a gap is more than noise: the sample standard deviation of the
    examples' gaps (each example's loss with another's camera minus with its own) over sqrt(n)."""
    model, cfg, batch = tiny_model(1.0), flow.FlowConfig(), eval_batch()
    true = evaluate.fixed_noise_loss(model, batch, cfg)
    shuffled = evaluate.fixed_noise_loss(model, {**batch, "camera": np.roll(batch["camera"], 1, axis=0)}, cfg)
    gaps = np.asarray(shuffled - true, np.float64)
    assert gaps.std() > 1e-3  # the examples' gaps differ: a standard error of 0 would be wrong
    metrics = evaluate.mean_metrics([evaluate.camera_sensitivity(model, batch, cfg)])
    assert metrics["camera_gap"] == pytest.approx(gaps.mean(), rel=1e-4)
    assert metrics["camera_gap_stderr"] == pytest.approx(gaps.std(ddof=1) / np.sqrt(len(gaps)), rel=1e-3)
    assert "camera_gap_sq" not in metrics


def test_cli_prints_the_gap_over_prepared_shards_with_the_weights_shift_and_timestep_dtype(tmp_path, capsys):
    root = str(tmp_path)
    shards = os.path.join(root, "shards")
    demo_data.write_dataset(root, num_scenes=3, num_frames=9, height=32, width=32)
    demo_data.prepare_demo(root, shards, num_frames=9, height=32, width=32, num_val_scenes=2, scenes_per_shard=2)
    params = str(tmp_path / "tiny.ckpt")
    convert.save_pytorch(tiny_model(1.0, timestep_dtype="bfloat16"), params, shift=3.0)  # recorded beside the weights: the CLI needs no flags for them
    capsys.readouterr()  # not prepare's report
    evaluate.main(["--params", params, "--num_heads", "4", "--data", shards, "--batch_size", "4", "--text_len", "16"])
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(printed) == {"eval_loss", "eval_loss_shuffled_cameras", "camera_gap", "camera_gap_stderr"}
    values = {k: float(v) for k, v in printed.items()}
    assert np.isfinite(values["eval_loss"]) and abs(values["camera_gap"]) > 1e-3
    # Printed to 6 significant digits: the difference of two printed losses is good to about 1e-5.
    assert values["camera_gap"] == pytest.approx(values["eval_loss_shuffled_cameras"] - values["eval_loss"], abs=2e-5)

    def eval_loss(timestep_dtype, shift, loss_weighting="bsmntw"):  # the trainer's default weighting
        model = convert.load_any(params, timestep_dtype=timestep_dtype)
        batches = loader.make_eval_iterator(shards, batch_size=4, text_len=16)
        return evaluate.evaluate(model, batches, flow.FlowConfig(shift=shift, loss_weighting=loss_weighting))["eval_loss"]

    assert values["eval_loss"] == pytest.approx(eval_loss("bfloat16", 3.0), rel=1e-5)
    assert values["eval_loss"] != pytest.approx(eval_loss("float32", 3.0), rel=1e-5)
    assert values["eval_loss"] != pytest.approx(eval_loss("bfloat16", 5.0), rel=1e-5)
    assert values["eval_loss"] != pytest.approx(eval_loss("bfloat16", 3.0, "none"), rel=1e-5)


def test_eval_loss_is_the_mean_over_examples_whatever_the_batching():
    """Batches of 3 and of 1 example + 2 weight-0 padding rows (how the loader completes a pass) give the
    mean over the 4 examples: padding weighs nothing, and a batch counts by its examples."""
    model, cfg, batch = tiny_model(1.0), flow.FlowConfig(), eval_batch()
    rows = lambda index, weight: {**{k: v[np.array(index)] for k, v in batch.items()},
                                  "eval_weight": jax.numpy.asarray(weight, jax.numpy.float32)}
    whole = evaluate.mean_metrics([evaluate.camera_sensitivity(model, batch, cfg)])
    batched = evaluate.mean_metrics([evaluate.camera_sensitivity(model, rows([0, 1, 2], [1, 1, 1]), cfg),
                                     evaluate.camera_sensitivity(model, rows([3, 1, 2], [1, 0, 0]), cfg)])
    assert batched.keys() == whole.keys() == {"eval_loss", "eval_loss_shuffled_cameras", "camera_gap",
                                              "camera_gap_stderr"}
    assert batched["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
