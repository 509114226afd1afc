"""Wan2.1 VAE weights: PyTorch files (official `Wan2.1_VAE.pth` or diffusers `AutoencoderKLWan`) ↔ Flax.

Flax parameter paths are diffusers' names with `kernel` for `weight` and `resample_conv` for
`resample.1`; the official layout is a rename of diffusers' (`original_key`). Conv kernels are
(out, in, *window) in PyTorch and (*window, in, out) in Flax; norm scales are (C, 1, 1[, 1]) vs (C,).
The layout of a file is detected from its keys. All reads and writes go through `torch_io`: a bad
file raises `CheckpointError` listing every missing, unexpected or mis-shaped key, and nothing is
written.

    python -m recam_jax.vae_convert Wan2.1_VAE.pth vae_diffusers.safetensors --layout diffusers
"""

from __future__ import annotations

import argparse
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from recam_jax.models.vae import VAE_CONFIGS, WanVAE
from recam_jax.torch_io import CheckpointError, check_names_and_shapes, open_state_dict, save_state_dict

LAYOUTS = ("diffusers", "original")

# Inside a residual block (always after an index): diffusers name → official nn.Sequential position.
_RESIDUAL_RENAMES = (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                     ("conv2", "residual.6"), ("conv_shortcut", "shortcut"))
_RENAMES = (
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"\.mid_block\.resnets\.0\.", ".middle.0."),
    (r"\.mid_block\.attentions\.0\.", ".middle.1."),
    (r"\.mid_block\.resnets\.1\.", ".middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
)


def diffusers_key(path: tuple) -> str:
    """The diffusers `AutoencoderKLWan` key of a Flax parameter path."""
    key = ".".join(map(str, path)).replace("resample_conv", "resample.1")
    return key[: -len("kernel")] + "weight" if key.endswith(".kernel") else key


def original_key(key: str, num_res_blocks: int) -> str:
    """The official Wan2.1 `WanVAE_` key of a diffusers key (decoder blocks are one flat list there)."""
    for name, position in _RESIDUAL_RENAMES:
        key = re.sub(rf"\.(\d+)\.{name}\.", rf".\1.{position}.", key)
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    per_block = num_res_blocks + 2  # num_res_blocks + 1 residual blocks, then the upsampler
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda m: f"decoder.upsamples.{int(m[1]) * per_block + int(m[2])}.", key)
    return re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.upsamples.{int(m[1]) * per_block + per_block - 1}.", key)


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    """PyTorch shape of a Flax parameter: kernels reversed to (out, in, *window), norm scales broadcastable."""
    if path[-1] == "kernel":
        return (shape[-1], shape[-2], *shape[:-2])
    if path[-1] == "gamma":  # the attention norm works on 2D images, the others on 3D video
        return (shape[0], 1, 1) if "attentions" in path else (shape[0], 1, 1, 1)
    return shape


def to_torch(path: tuple, array: np.ndarray) -> np.ndarray:
    """A Flax parameter in PyTorch layout."""
    shape = _torch_shape(path, array.shape)
    if path[-1] == "kernel":
        array = array.transpose(array.ndim - 1, array.ndim - 2, *range(array.ndim - 2))
    return np.ascontiguousarray(array.reshape(shape))


def from_torch(path: tuple, array: np.ndarray, shape: tuple) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax parameter `path` of `shape`."""
    if path[-1] == "kernel":
        array = array.transpose(*range(2, array.ndim), 1, 0)
    return array.reshape(shape)


def torch_names(model: WanVAE, layout: str) -> dict[str, tuple]:
    """PyTorch key → Flax parameter path, for every parameter of `model`, in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = diffusers_key(path)
        names[key if layout == "diffusers" else original_key(key, model.config.num_res_blocks)] = path
    return names


def detect_layout(source: str, keys) -> str:
    """'diffusers' or 'original', from the name of the encoder's first convolution."""
    keys = set(keys)
    if "encoder.conv_in.weight" in keys:
        return "diffusers"
    if "encoder.conv1.weight" in keys:
        return "original"
    raise CheckpointError(f"{source}: not a Wan VAE state dict: neither 'encoder.conv_in.weight' (diffusers) "
                          f"nor 'encoder.conv1.weight' (official Wan) is present")


def load_weights(model: WanVAE, path: str) -> str:
    """Loads a PyTorch VAE file of either layout into `model` (in place); returns the layout found."""
    state = open_state_dict(path)
    layout = detect_layout(path, state)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = torch_names(model, layout)
    expected = {key: _torch_shape(p, params[p].shape) for key, p in names.items()}
    check_names_and_shapes(path, expected, state.shapes)
    for key, p in names.items():
        params[p][...] = jnp.asarray(from_torch(p, state[key], params[p].shape), params[p].dtype)
    return layout


def state_dict(model: WanVAE, layout: str) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch state dict (numpy arrays) in `layout`."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {key: to_torch(p, np.asarray(params[p][...])) for key, p in torch_names(model, layout).items()}


def save_weights(model: WanVAE, path: str, layout: str) -> None:
    """Writes the model's weights as `.safetensors` or a `.pth`-style pickle, atomically."""
    save_state_dict(state_dict(model, layout), path)


def main(argv=None) -> None:
    """Converts a VAE file between layouts (and formats), checking it against the model on the way."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Wan2.1_VAE.pth or a diffusers AutoencoderKLWan .safetensors / folder")
    parser.add_argument("target", help="output .safetensors or .pth")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="output layout (default: the other one)")
    parser.add_argument("--config", choices=sorted(VAE_CONFIGS), default="wan2.1")
    args = parser.parse_args(argv)
    model = WanVAE(VAE_CONFIGS[args.config], rngs=nnx.Rngs(0))
    found = load_weights(model, args.source)
    layout = args.layout or next(name for name in LAYOUTS if name != found)
    save_weights(model, args.target, layout)
    print(f"{args.source} ({found}) -> {args.target} ({layout})")


if __name__ == "__main__":
    main()
