"""PyTorch ⇄ Flax weights of the ReCamMaster / Wan2.1 DiT.

Layouts (detected automatically on import):
- `wan`: the original Wan2.1 / DiffSynth `WanModel` names (`blocks.N.self_attn.q.weight`, ...), a
  single `.safetensors` or a sharded one with an index json (as the 14B ships);
- `recammaster`: `wan` plus `blocks.N.cam_encoder.*` and `blocks.N.projector.*` (the released
  `step20000.ckpt`, a `torch.save` of the state dict);
- `diffusers`: `WanTransformer3DModel` names (camera modules, if any, under the same extra names).
A checkpoint without camera modules gets them at ReCamMaster's official init (a no-op).

    python -m recam_jax.convert IN OUT [--num-heads N] [--dtype bfloat16]

IN and OUT are PyTorch files (`.ckpt`/`.pth` → recammaster layout, `.safetensors` → wan layout, a
folder ending in `diffusers` → a diffusers model folder) or an orbax folder (anything else), the
format the trainer restores. The model size is read off the tensor shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from recam_jax import storage, torch_io
from recam_jax.models.dit import CAMERA_INIT, DiTConfig, WanDiT

WAN_HEAD_DIM = 128  # every released Wan2.1 size uses 128-wide heads


@dataclasses.dataclass(frozen=True)
class Weight:
    """One tensor: its official (Wan) name, diffusers name, Flax path, and layout kind."""

    wan: str
    diffusers: str
    path: tuple
    kind: str  # "linear": torch (out, in) ⇄ flax (in, out); "conv": (o, i, t, h, w) ⇄ (t, h, w, i, o); "copy"


def _linear(wan: str, diffusers: str, path: tuple) -> list[Weight]:
    return [Weight(f"{wan}.weight", f"{diffusers}.weight", (*path, "kernel"), "linear"),
            Weight(f"{wan}.bias", f"{diffusers}.bias", (*path, "bias"), "copy")]


def _block_weights(i: int, camera: bool) -> list[Weight]:
    wan, dif, path = f"blocks.{i}", f"blocks.{i}", ("blocks", i)
    weights = [Weight(f"{wan}.modulation", f"{dif}.scale_shift_table", (*path, "modulation"), "copy"),
               Weight(f"{wan}.norm3.weight", f"{dif}.norm2.weight", (*path, "norm3", "scale"), "copy"),
               Weight(f"{wan}.norm3.bias", f"{dif}.norm2.bias", (*path, "norm3", "bias"), "copy")]
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for proj, dproj in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
            weights += _linear(f"{wan}.{ours}.{proj}", f"{dif}.{theirs}.{dproj}", (*path, ours, proj))
        for norm in ("norm_q", "norm_k"):
            weights.append(Weight(f"{wan}.{ours}.{norm}.weight", f"{dif}.{theirs}.{norm}.weight",
                                  (*path, ours, norm, "scale"), "copy"))
    weights += _linear(f"{wan}.ffn.0", f"{dif}.ffn.net.0.proj", (*path, "ffn", "fc1"))
    weights += _linear(f"{wan}.ffn.2", f"{dif}.ffn.net.2", (*path, "ffn", "fc2"))
    if camera:
        for module in CAMERA_INIT:
            weights += _linear(f"{wan}.{module}", f"{dif}.{module}", (*path, module))
    return weights


def weight_table(cfg: DiTConfig) -> list[Weight]:
    """Every tensor of the model with its names in each layout."""
    weights = [Weight("patch_embedding.weight", "patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
               Weight("patch_embedding.bias", "patch_embedding.bias", ("patch_embedding", "bias"), "copy")]
    weights += _linear("text_embedding.0", "condition_embedder.text_embedder.linear_1", ("text_embedding", "fc1"))
    weights += _linear("text_embedding.2", "condition_embedder.text_embedder.linear_2", ("text_embedding", "fc2"))
    weights += _linear("time_embedding.0", "condition_embedder.time_embedder.linear_1", ("time_embedding", "fc1"))
    weights += _linear("time_embedding.2", "condition_embedder.time_embedder.linear_2", ("time_embedding", "fc2"))
    weights += _linear("time_projection.1", "condition_embedder.time_proj", ("time_projection",))
    for i in range(cfg.num_layers):
        weights += _block_weights(i, cfg.camera)
    weights += _linear("head.head", "proj_out", ("head", "head"))
    weights.append(Weight("head.modulation", "scale_shift_table", ("head", "modulation"), "copy"))
    return weights


# Axis order of the PyTorch tensor in terms of the Flax array's axes, per kind of weight.
TORCH_AXES = {"linear": (1, 0), "conv": (4, 3, 0, 1, 2), "copy": None}


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    axes = TORCH_AXES[kind]
    return array if axes is None else array.transpose(axes)


def to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    axes = TORCH_AXES[kind]
    return array if axes is None else array.transpose(np.argsort(axes))


def detect_layout(names) -> str:
    """'diffusers', 'recammaster' or 'wan' from the tensor names."""
    names = set(names)
    if "condition_embedder.time_proj.weight" in names:
        return "diffusers"
    if "time_projection.1.weight" in names:
        return "recammaster" if "blocks.0.cam_encoder.weight" in names else "wan"
    raise torch_io.CheckpointError(
        "not a Wan2.1 DiT checkpoint: found neither 'time_projection.1.weight' (Wan/ReCamMaster layout) nor "
        "'condition_embedder.time_proj.weight' (diffusers layout)")


def infer_config(shapes: Mapping[str, tuple], num_heads: int | None = None, **overrides) -> DiTConfig:
    """The DiT size read off a checkpoint's tensor shapes (heads: Wan's 128-wide unless given)."""
    layout = detect_layout(shapes)
    table = {w.wan: w.diffusers for w in weight_table(DiTConfig(1, 1, 1, 1))}
    name = (lambda wan: table[wan]) if layout == "diffusers" else (lambda wan: wan)
    try:
        dim, in_dim = shapes[name("patch_embedding.weight")][:2]
        patch = tuple(shapes[name("patch_embedding.weight")][2:])
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
        cfg = dict(
            dim=dim, in_dim=in_dim, patch_size=patch, num_layers=max(blocks) + 1,
            ffn_dim=shapes[name("blocks.0.ffn.0.weight")][0],
            num_heads=num_heads or max(dim // WAN_HEAD_DIM, 1),
            text_dim=shapes[name("text_embedding.0.weight")][1],
            freq_dim=shapes[name("time_embedding.0.weight")][1],
            out_dim=shapes[name("head.head.weight")][0] // int(np.prod(patch)),
        )
    except (KeyError, ValueError) as e:
        raise torch_io.CheckpointError(f"cannot read the model size from the checkpoint: missing {e}") from e
    return DiTConfig(**{**cfg, **overrides})


def abstract_model(cfg: DiTConfig) -> WanDiT:
    """The model's structure and shapes, nothing allocated."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def import_weights(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig, source: str = "checkpoint",
                   on_host: bool = False) -> WanDiT:
    """A Flax model holding the weights of a PyTorch state dict (any layout), tensor by tensor.

    The checkpoint must match `cfg` exactly (every missing, unexpected or wrong-shaped tensor is
    listed); camera modules absent from the checkpoint start at their official init. With
    `on_host` the weights stay numpy arrays in host memory, for the caller to place shard by shard
    (a 14B model does not fit on the one default device).
    """
    layout = detect_layout(state_dict)
    name_of = (lambda w: w.diffusers) if layout == "diffusers" else (lambda w: w.wan)
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    flat = dict(state.flat_state())
    table = weight_table(cfg)
    has_camera = any(name_of(w) in state_dict for w in table if w.path[-2] in CAMERA_INIT)
    expected = {name_of(w): _torch_shape(flat[w.path].shape, w.kind) for w in table
                if has_camera or w.path[-2] not in CAMERA_INIT}
    found = getattr(state_dict, "shapes", None) or {k: tuple(v.shape) for k, v in state_dict.items()}
    torch_io.check_names_and_shapes(source, expected, found)
    to_array = np.asarray if on_host else jnp.asarray
    for w in table:
        variable = flat[w.path]
        if name_of(w) in state_dict:
            value = to_flax_layout(state_dict[name_of(w)], w.kind)
        else:  # a camera module the checkpoint lacks
            init = CAMERA_INIT[w.path[-2]] if w.path[-1] == "kernel" else nnx.initializers.zeros
            value = init(None, variable.shape, variable.dtype)
        variable.set_value(to_array(value, dtype=variable.dtype))
    nnx.update(model, state)
    return model


def _whole_on_host(array) -> np.ndarray:
    """The whole array in this host's memory; an array sharded over several hosts is gathered
    (a collective: every process must make the same calls)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _torch_shape(flax_shape: tuple, kind: str) -> tuple:
    axes = TORCH_AXES[kind]
    return tuple(flax_shape) if axes is None else tuple(flax_shape[a] for a in axes)


def export_weights(model: WanDiT, layout: str, dtype=None) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state dict ('recammaster', 'wan' or 'diffusers').

    'wan' drops the camera modules (a plain Wan2.1 checkpoint); the others keep them.
    """
    if layout not in ("recammaster", "wan", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}")
    flat = dict(nnx.state(model, nnx.Param).flat_state())
    out = {}
    for w in weight_table(model.cfg):
        if layout == "wan" and w.path[-2] in CAMERA_INIT:
            continue
        array = _whole_on_host(flat[w.path][...])
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        out[w.diffusers if layout == "diffusers" else w.wan] = np.ascontiguousarray(to_torch_layout(array, w.kind))
    return out


# --- files: PyTorch checkpoints, diffusers folders, orbax folders ---------------------------------

DIT_CONFIG_FILE = "dit_config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _is_torch_path(path: str) -> bool:
    return path.endswith((".safetensors", ".index.json", *torch_io.PICKLE_SUFFIXES)) or _is_diffusers_dir(path)


def _is_diffusers_dir(path: str) -> bool:
    return storage.basename(path).endswith("diffusers") or storage.exists(storage.join(path, DIFFUSERS_WEIGHTS))


def load_pytorch(path: str, cfg: DiTConfig | None = None, num_heads: int | None = None, on_host: bool = False,
                 **overrides) -> WanDiT:
    """A Flax model from any PyTorch DiT checkpoint (file, sharded index, or diffusers folder).

    With `cfg` the checkpoint must match it; without, the size is read off the tensor shapes.
    `on_host`: as in `import_weights`.
    """
    state_dict = torch_io.open_state_dict(path)
    cfg = cfg or infer_config(state_dict.shapes, num_heads=num_heads, **overrides)
    return import_weights(state_dict, cfg, source=path, on_host=on_host)


def save_pytorch(model: WanDiT, path: str, dtype=None) -> None:
    """Writes `.ckpt`/`.pth` (recammaster layout), `.safetensors` (wan layout) or a diffusers folder.

    In a multi-host job every process calls it (the weights are gathered) and the first one writes.
    """
    if path.endswith(".safetensors"):
        layout, weights_file = "wan", path
    elif path.endswith(torch_io.PICKLE_SUFFIXES):
        layout, weights_file = "recammaster", path
    else:
        layout, weights_file = "diffusers", storage.join(path, DIFFUSERS_WEIGHTS)
    state_dict = export_weights(model, layout, dtype)
    if jax.process_index() != 0:
        return
    torch_io.save_state_dict(state_dict, weights_file)
    if layout == "diffusers":
        storage.write_json(storage.join(path, "config.json"), diffusers_config(model.cfg))


def diffusers_config(cfg: DiTConfig) -> dict:
    """The `WanTransformer3DModel` config of the same model (camera modules are extra weights)."""
    return dict(_class_name="WanTransformer3DModel", patch_size=list(cfg.patch_size), num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps)


def save_orbax(model: WanDiT, path: str) -> None:
    """Params as an orbax checkpoint plus the model config next to them."""
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.join(path, "params"), nnx.state(model, nnx.Param))
    storage.write_json(storage.join(path, DIT_CONFIG_FILE), dataclasses.asdict(model.cfg))


def load_orbax(path: str, cfg: DiTConfig | None = None, on_host: bool = False, **overrides) -> WanDiT:
    """The model saved by `save_orbax` (numerics overridable; with `cfg`, that config).

    `on_host`: the weights are restored as numpy arrays in host memory, as in `import_weights`.
    """
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    config_file = storage.join(path, DIT_CONFIG_FILE)
    if not storage.exists(config_file):
        raise torch_io.CheckpointError(f"{path}: not a recam_jax params folder (no {DIT_CONFIG_FILE})")
    fields = storage.read_json(config_file)
    cfg = cfg or DiTConfig(**{**fields, "patch_size": tuple(fields["patch_size"]), **overrides})
    model = abstract_model(cfg)
    abstract_params = nnx.state(model, nnx.Param)
    if on_host:  # numpy targets make orbax restore numpy arrays (np.empty: pages are only touched by the read)
        abstract_params = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract_params)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(storage.join(path, "params"), abstract_params)
    nnx.update(model, params)
    return model


def load_any(path: str, cfg: DiTConfig | None = None, num_heads: int | None = None, on_host: bool = False,
             **overrides) -> WanDiT:
    """A model from a PyTorch checkpoint or a recam_jax orbax folder (`on_host`: numpy weights)."""
    if _is_torch_path(path):
        return load_pytorch(path, cfg, num_heads=num_heads, on_host=on_host, **overrides)
    return load_orbax(path, cfg, on_host=on_host, **overrides)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="PyTorch checkpoint, diffusers folder, or recam_jax orbax folder")
    parser.add_argument("output", help=".ckpt/.pth (ReCamMaster), .safetensors (Wan), *diffusers folder, or orbax folder")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: dim / 128, as Wan)")
    parser.add_argument("--dtype", default=None, help="dtype of exported PyTorch tensors (default: as stored)")
    args = parser.parse_args(argv)
    model = load_any(args.input, num_heads=args.num_heads, on_host=True)  # conversion never needs a device
    if _is_torch_path(args.output):
        save_pytorch(model, args.output, dtype=args.dtype)
    else:
        save_orbax(model, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
