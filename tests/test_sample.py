"""Sampling: the Euler integrator lands on the data under the exact velocity; the CLI runs end to end."""

import csv
import os

import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import cameras, demo_data, video, video_encoder
from recam_jax import compile as planner
from recam_jax import convert, flow, sample, trajectory
from recam_jax.models import camera_encoding
from recam_jax.models.dit import WanDiT, dit_config
from tests import peers
from tests.test_attention import tpu_topology
from tests.test_camera_encoding import model as tiny_model
from tests.test_camera_encoding import randomize

REQUIRED = ["--params", "p", "--text_encoder_dir", "t"]  # the CLI's required flags; everything else default


def test_euler_with_the_exact_velocity_reaches_the_data():
    keys = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(keys[0], (2, 3, 4, 4, 16))
    source = jax.random.normal(keys[1], (2, 3, 4, 4, 16))

    def exact_velocity(latents, timesteps, text, camera, intrinsics):
        """v = ε − x0 for the ε that explains x_σ on the target half; wrong unless the source half is `source`."""
        x, src = latents[:, :3], latents[:, 3:]
        sigma = timesteps[:, None, None, None, None] / flow.NUM_TRAIN_TIMESTEPS
        wrong_source = jnp.any(src != source).astype(jnp.float32)
        return jnp.concatenate([(x - x0) / sigma + wrong_source, jnp.zeros_like(src)], axis=1)

    sigmas = flow.shifted_sigmas(12, shift=5.0)
    noise = jax.random.normal(keys[2], x0.shape)
    out = sample.euler_sample(exact_velocity, noise, source, None, None, None, sigmas, guidance=1.0)
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_guidance_extrapolates_from_the_negative_caption():
    def constant_velocity(latents, timesteps, text, camera, intrinsics):
        return jnp.broadcast_to(text, latents.shape)

    noise = jnp.zeros((1, 2, 2, 2, 16))
    args = (noise, noise, jnp.ones(()), jnp.zeros(()), None, np.array([1.0]))
    # One step from σ = 1 to 0 moves x by −v: v = 0 + g·(1 − 0) = g.
    np.testing.assert_allclose(sample.euler_sample(constant_velocity, *args, guidance=3.0), -3.0)
    np.testing.assert_allclose(sample.euler_sample(constant_velocity, *args, guidance=1.0), -1.0)


@pytest.mark.parametrize("encoding", camera_encoding.ENCODINGS)
def test_the_sampler_hands_the_target_lens_to_the_model(encoding):
    """Renders along a pan with and without a zoom: they differ for the encodings that read the lens
    (trained extra module), and an official model renders as it does without any intrinsics."""
    dit = tiny_model(encoding)
    if encoding != "official":
        randomize(getattr(dit.blocks, camera_encoding.EXTRA_MODULES[encoding][0]))
    dit = sample.dit_function(*nnx.split(dit))
    rng = np.random.default_rng(0)
    noise, source = (jnp.asarray(rng.standard_normal((1, 3, 4, 4, 16)), jnp.float32) for _ in range(2))
    text = jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)
    camera = cameras.inference_camera(trajectory.load("pan:10", frames=9))[None]

    def render(spec):
        lens = None if spec is None else sample.lens_input(
            {"trajectory": spec, "camera": 1, "source_focal_mm": 24.0}, 9, 1.0)[None]
        return np.asarray(sample.euler_sample(dit, noise, source, text, text, camera, flow.shifted_sigmas(2, 5.0),
                                              guidance=1.0, intrinsics=lens, step=sample.denoise_step))

    still, zoom = render("pan:10"), render("pan:10+focal:60")
    assert np.isfinite(zoom).all()
    if encoding == "official":
        np.testing.assert_array_equal(zoom, still)
        np.testing.assert_array_equal(still, render(None))
    else:
        assert np.abs(zoom - still).max() > 1e-3


def demo_scene(tmp_path):
    """A one-scene demo dataset, a tiny umT5 and tiny DiT weights: (scene folder, common CLI flags)."""
    root = str(tmp_path)
    demo_data.write_dataset(root, num_scenes=1, num_frames=9, height=32, width=32)
    demo_data.write_tiny_umt5(os.path.join(root, "umt5"), demo_data.WORDS)
    params = str(tmp_path / "tiny.ckpt")
    convert.save_pytorch(WanDiT(dit_config("tiny"), rngs=nnx.Rngs(0)), params)
    flags = ["--params", params, "--text_encoder_dir", os.path.join(root, "umt5"),
             "--vae", "demo", "--num_frames", "9", "--height", "32", "--width", "32", "--text_len", "16",
             "--steps", "3"]
    return os.path.join(root, "train", "f18_aperture10", "scene1"), flags


def test_the_shift_comes_from_the_weights_record_unless_asked(tmp_path):
    """Sampling needs no --shift: the training shift recorded with an export, else the official 5."""
    model = WanDiT(dit_config("tiny"), rngs=nnx.Rngs(0))
    recorded, plain = str(tmp_path / "trained.ckpt"), str(tmp_path / "plain.safetensors")
    convert.save_pytorch(model, recorded, shift=3.0)
    convert.save_pytorch(model, plain)
    assert sample.sampling_shift(None, recorded) == 3.0
    assert sample.sampling_shift(None, plain) == sample.OFFICIAL_SHIFT == 5.0
    assert sample.sampling_shift(7.0, recorded) == 7.0


def test_cli_renders_a_video_along_a_trajectory(tmp_path, capsys):
    scene, flags = demo_scene(tmp_path)
    out = str(tmp_path / "out.mp4")
    sample.main([*flags, "--video", os.path.join(scene, "videos", "cam01.mp4"), "--caption", "a ball",
                 "--trajectory", os.path.join(scene, "cameras", "camera_extrinsics.json"), "--camera", "3",
                 "--out", out])
    frames = video.read_video(out, 9, 32, 32)
    assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
    assert "3/3" in capsys.readouterr().err  # the progress bar went through every denoising step
    assert next(imageio_ffmpeg.read_frames(out))["fps"] == 30  # the official inference's frame rate


def test_cli_batch_renders_each_row_and_a_grid(tmp_path):
    scene, flags = demo_scene(tmp_path)
    rows = [{"video": os.path.join(scene, "videos", "cam01.mp4"), "caption": "a ball", "trajectory": "pan_right"},
            {"video": os.path.join(scene, "videos", "cam02.mp4"), "caption": "a red ball",
             "trajectory": os.path.join(scene, "cameras", "camera_extrinsics.json"), "camera": "3"}]
    table = tmp_path / "batch.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["video", "caption", "trajectory", "camera"])
        writer.writeheader()
        writer.writerows(rows)
    out_dir = tmp_path / "renders"
    out_dir.mkdir()
    sample.main([*flags, "--batch", str(table), "--out_dir", str(out_dir)])
    assert sorted(os.listdir(out_dir)) == ["000_cam01.mp4", "001_cam02.mp4", "grid.mp4"]
    grid = video.read_video(str(out_dir / "grid.mp4"), 9, 64, 64)  # 2 rows of [source | render]
    for i, row in enumerate(rows):
        source = video.read_video(row["video"], 9, 32, 32)
        render = video.read_video(str(out_dir / f"00{i}_cam0{i + 1}.mp4"), 9, 32, 32)
        assert np.abs(grid[:, 32 * i:32 * (i + 1), :32] - source).mean() < 0.05  # codec noise only
        assert np.abs(grid[:, 32 * i:32 * (i + 1), 32:] - render).mean() < 0.05


def test_batch_csv_errors_name_the_file_line_and_column(tmp_path):
    table = tmp_path / "batch.csv"
    table.write_text("video,caption\na.mp4,a ball\n")
    with pytest.raises(ValueError, match=r"batch.csv: missing column\(s\) \['trajectory'\]"):
        sample.read_batch(str(table))
    table.write_text("video,caption,trajectory\na.mp4,a ball,pan_right\nb.mp4,,pan_left\n")
    with pytest.raises(ValueError, match=r"batch.csv: line 3: empty \['caption'\]"):
        sample.read_batch(str(table))
    table.write_text("video,caption,trajectory,source_focal_mm\na.mp4,a ball,pan_right,35\nb.mp4,a ball,pan_left,wide\n")
    with pytest.raises(ValueError, match=r"batch.csv: line 3: source_focal_mm 'wide' is not a positive number"):
        sample.read_batch(str(table))


def test_the_source_lens_is_a_batch_row_s_else_the_flag_s(tmp_path):
    table = tmp_path / "batch.csv"
    table.write_text("video,caption,trajectory,source_focal_mm\na.mp4,a ball,pan_right,35\nb.mp4,a ball,pan_left,\n")
    args = sample.build_parser().parse_args([*REQUIRED, "--batch", str(table), "--out_dir", "o", "--source_focal_mm", "18"])
    assert [job["source_focal_mm"] for job in sample.jobs_of(args)] == [35.0, 18.0]
    assert sample.build_parser().parse_args(REQUIRED).source_focal_mm == trajectory.DEFAULT_FOCAL_MM
    with pytest.raises(ValueError, match="--source_focal_mm -5: a focal length is a positive number of mm"):
        sample.jobs_of(sample.build_parser().parse_args([*REQUIRED, "--source_focal_mm", "-5"]))


def official_size_on_one_v5p_chip(attention=None, num_layers=1):
    """The CLI's defaults (81 × 480 × 832 video, 512 text tokens) as a 1.3B config of `num_layers`
    blocks, the attention the CLI would pick, and a one-chip v5p mesh (a topology description)."""
    tpu_topology("v5p:2x2x1")  # skips, saying why, without libtpu
    devices = planner.topology_devices("v5p:1x1x1")
    args = sample.build_parser().parse_args(REQUIRED)
    cfg = dit_config("1.3B", num_layers=num_layers, dtype=args.dtype,
                     attention=attention or args.attention or sample.default_attention(devices))
    latent_shape = video_encoder.latent_shape(args.num_frames, args.height, args.width, cfg.in_dim)
    return cfg, sample.sampling_mesh(args.mesh, devices), latent_shape, args


@pytest.mark.slow
def test_default_options_compile_for_one_v5p_chip_at_the_official_size():
    """One block at the real 65,520-token length (blocks run one after another, so the temporaries
    of 30 do not grow; docs/sampling.md scales the weights)."""
    cfg, mesh, latent_shape, args = official_size_on_one_v5p_chip()
    assert cfg.attention == "splash" and sample.tokens_per_example(cfg, latent_shape) == 65_520
    with jax.default_matmul_precision("default"):  # the CLI's precision, not the tests' "highest"
        compiled = sample.compile_denoise_step(cfg, mesh, latent_shape, args.text_len, guidance=args.guidance,
                                               device_memory_bytes=planner.device_memory(list(mesh.devices.flat)))
    memory = planner.memory_bytes(compiled)
    assert 0 < memory["total"] < 95 * planner.GiB
    assert "splash" in compiled.as_text()  # the Pallas kernel, not an XLA fallback


def test_xla_attention_at_the_official_size_is_refused_naming_the_memory():
    cfg, mesh, latent_shape, args = official_size_on_one_v5p_chip(attention="xla")
    with pytest.raises(ValueError, match=r"12 × 65,520² float32 score matrix: 191\.9 GiB .* 95\.0 GiB of one TPU v5"):
        sample.compile_denoise_step(cfg, mesh, latent_shape, args.text_len,
                                    device_memory_bytes=planner.device_memory(list(mesh.devices.flat)))


def test_the_timestep_dtype_comes_from_the_weights_record_unless_asked(tmp_path):
    """Official releases (no record) were trained on bf16 timesteps; our exports record their own."""
    trained = str(tmp_path / "trained.ckpt")
    convert.save_pytorch(WanDiT(dit_config("tiny", timestep_dtype="bfloat16"), rngs=nnx.Rngs(0)), trained)
    official = str(tmp_path / "official.ckpt")
    convert.save_pytorch(WanDiT(dit_config("tiny"), rngs=nnx.Rngs(0)), official)
    os.remove(official + convert.RECORD_SUFFIX)
    assert sample.sampling_timestep_dtype(None, trained) == "bfloat16"
    assert sample.sampling_timestep_dtype("float32", trained) == "float32"
    assert sample.sampling_timestep_dtype(None, official) == "bfloat16"
    legacy = {**convert.read_model_record(trained), "timestep_dtype": None}  # a record from before the field
    assert convert.trained_timestep_dtype(legacy) == "float32"
    convert.save_pytorch(WanDiT(dit_config("tiny"), rngs=nnx.Rngs(0)), trained)
    assert sample.sampling_timestep_dtype(None, trained) == "float32"


def test_the_default_negative_caption_is_the_official_inference_s():
    script = os.path.join(peers.RECAMMASTER, "inference_recammaster.py")
    if not os.path.exists(script):
        pytest.skip(f"the official ReCamMaster source is not at {script} (../shared/peers is optional)")
    with open(script, encoding="utf-8") as f:
        assert f'negative_prompt="{sample.WAN_NEGATIVE_PROMPT}"' in f.read()
    assert sample.build_parser().parse_args(REQUIRED).negative_caption == sample.WAN_NEGATIVE_PROMPT
