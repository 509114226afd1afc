"""Our DiT and our .ckpt export against the official ReCamMaster model: DiffSynth's `WanModel` with the
camera modules `train_recammaster.py` adds to every block, built from ../shared/peers at test time."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from recam_jax import convert
from tests import peers

DIM, HEADS, FFN, TEXT_DIM, FREQ_DIM, LAYERS = 48, 2, 72, 20, 32, 2  # head_dim 24: RoPE parts 8/8/8
GRID = (30, 52)  # the official block hard-codes this latent token grid (480x832 video)


@pytest.fixture(scope="module")
def wan_video_dit():
    """diffsynth/models/wan_video_dit.py, loaded by path (tests/peers.py)."""
    try:
        with peers.official_modules(peers.WAN_VIDEO_DIT) as (module,):
            yield module
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


def official_recammaster(wan_video_dit, seed):
    """WanModel plus per-block cam_encoder/projector as train_recammaster.py adds them, every weight
    random (camera modules far from their zero / identity init, norm scales away from one)."""
    torch.manual_seed(seed)
    model = wan_video_dit.WanModel(dim=DIM, in_dim=16, ffn_dim=FFN, out_dim=16, text_dim=TEXT_DIM, freq_dim=FREQ_DIM,
                                   eps=1e-6, patch_size=(1, 2, 2), num_heads=HEADS, num_layers=LAYERS,
                                   has_image_input=False)
    for block in model.blocks:
        block.cam_encoder = torch.nn.Linear(12, DIM)
        block.projector = torch.nn.Linear(DIM, DIM)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "cam_encoder" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def official_forward(model, latents, timestep, text, camera):
    with torch.no_grad():
        out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(timestep),
                    cam_emb=torch.from_numpy(camera), context=torch.from_numpy(text))
    return out.permute(0, 2, 3, 4, 1).numpy()


def inputs(seed=0):
    """One example (the official head adds the timestep embedding unbatched): 2 target + 2 source latent frames."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, 4, 2 * GRID[0], 2 * GRID[1], 16)).astype(np.float32)
    text = rng.standard_normal((1, 7, TEXT_DIM)).astype(np.float32)
    camera = rng.standard_normal((1, 2, 12)).astype(np.float32)
    return latents, np.array([417.25], np.float32), text, camera


def relative_error(out, ref):
    return float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))


def test_forward_matches_official_and_export_loads_strictly(wan_video_dit, tmp_path):
    reference = official_recammaster(wan_video_dit, seed=0)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = convert.import_weights(state, convert.infer_config(
        {k: v.shape for k, v in state.items()}, num_heads=HEADS, dtype="float32"))
    latents, timestep, text, camera = inputs()
    expected = official_forward(reference, latents, timestep, text, camera)
    out = model(*(jnp.asarray(a) for a in (latents, timestep, text, camera)))
    assert relative_error(out, expected) <= 1e-5

    path = str(tmp_path / "step20000.ckpt")
    convert.save_pytorch(model, path)
    reloaded = official_recammaster(wan_video_dit, seed=1)
    reloaded.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in reference.state_dict().items())
    np.testing.assert_array_equal(official_forward(reloaded, latents, timestep, text, camera), expected)
