"""PyTorch ⇄ Flax weights of the ReCamMaster / Wan2.1 DiT.

Layouts (detected automatically on import):
- `wan`: the original Wan2.1 / DiffSynth `WanModel` names (`blocks.N.self_attn.q.weight`, ...), a
  single `.safetensors` or a sharded one with an index json (as the 14B ships: pass its folder);
- `recammaster`: `wan` plus `blocks.N.cam_encoder.*` and `blocks.N.projector.*` (the released
  `step20000.ckpt`, a `torch.save` of the state dict);
- `diffusers`: `WanTransformer3DModel` names (camera modules, if any, under the same extra names).
A checkpoint without camera modules gets them at ReCamMaster's official init (a no-op); one without
the extra module of a `camera_encoding` (`blocks.N.intrinsics_encoder.*`, `blocks.N.plucker_encoder.*`)
gets it at its zero init, so Wan and ReCamMaster weights load into any encoding unchanged. Those
modules are kept by `.safetensors`, diffusers and orbax; the official `.ckpt` layout refuses them.

    python -m recam_jax.convert IN OUT [--num_heads N] [--dtype bfloat16]

IN and OUT are PyTorch files (`.ckpt`/`.pth` and `.safetensors` → recammaster layout, a folder
ending in `diffusers` → a diffusers model folder; IN may also be a folder of sharded safetensors
with their index) or an orbax folder (anything else), the format the trainer restores. Tensors
keep their dtype unless `--dtype` is given, and are converted one at a time.

The model record: tensor shapes do not tell the number of attention heads, so every export writes
the model's config, the training flow shift and timestep dtype beside the weights (`read_model_record`): in the
`.safetensors` header, in `FILE.recam_jax.json` beside a `.ckpt`, in `recam_jax.json` inside a
folder. A file without one (the official Wan / ReCamMaster releases) must be an official Wan2.1
size, or be given `--num_heads`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from recam_jax import storage, torch_io
from recam_jax.models import camera_encoding
from recam_jax.models.dit import CAMERA_INIT, VARIANTS, DiTConfig, WanDiT
from recam_jax.torch_io import CheckpointError, LazyTensor


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


def _block_weights(i: int, cfg: DiTConfig) -> list[Weight]:
    """The names of block `i`'s tensors; Flax paths are ("blocks", i, ...) in the model's flat state."""
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
    for module in camera_modules(cfg):
        weights += _linear(f"{wan}.{module}", f"{dif}.{module}", (*path, module))
    return weights


def camera_modules(cfg: DiTConfig) -> tuple[str, ...]:
    """The camera modules of each block: ReCamMaster's two, then the camera encoding's extra one."""
    if not cfg.camera:
        return ()
    extra = camera_encoding.EXTRA_MODULES.get(cfg.camera_encoding)
    return ("cam_encoder", "projector") + ((extra[0],) if extra else ())


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
        weights += _block_weights(i, cfg)
    weights += _linear("head.head", "proj_out", ("head", "head"))
    weights.append(Weight("head.modulation", "scale_shift_table", ("head", "modulation"), "copy"))
    return weights


def _is_camera(weight: Weight) -> bool:
    return weight.path[-2] in CAMERA_INIT


# Axis order of the PyTorch tensor in terms of the Flax array's axes, per kind of weight.
TORCH_AXES = {"linear": (1, 0), "conv": (4, 3, 0, 1, 2), "copy": None}


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    axes = TORCH_AXES[kind]
    return array if axes is None else array.transpose(axes)


def to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    axes = TORCH_AXES[kind]
    return array if axes is None else array.transpose(np.argsort(axes))


def _torch_shape(flax_shape: tuple, kind: str) -> tuple:
    axes = TORCH_AXES[kind]
    return tuple(flax_shape) if axes is None else tuple(flax_shape[a] for a in axes)


def detect_layout(names) -> str:
    """'diffusers', or 'recammaster' for the official names (Wan's, camera modules or not), from the tensor names."""
    names = set(names)
    if "condition_embedder.time_proj.weight" in names:
        return "diffusers"
    if "time_projection.1.weight" in names:
        return "recammaster"
    raise CheckpointError(
        "not a Wan2.1 DiT checkpoint: found neither 'time_projection.1.weight' (Wan/ReCamMaster layout) nor "
        "'condition_embedder.time_proj.weight' (diffusers layout)")


# --- the model record: what the tensor shapes do not say --------------------------------------------

RECORD_KEY = "recam_jax"  # key of the record in a .safetensors header's metadata
RECORD_FILE = "recam_jax.json"  # the record inside a folder (orbax params, diffusers folder)
RECORD_SUFFIX = ".recam_jax.json"  # the record beside a file: step20000.ckpt.recam_jax.json
LEGACY_CONFIG_FILE = "dit_config.json"  # orbax folders written before the record (no shift)
# The architecture; dtypes, remat and attention backend are choices of the run, not of the weights.
ARCHITECTURE = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                "patch_size", "eps", "camera", "camera_encoding")
SIZES = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "patch_size")


def model_record(cfg: DiTConfig, shift: float | None = None) -> dict:
    """{"dit": the architecture of `cfg`, "flow_shift": the σ shift it was trained with (None: unknown),
    "timestep_dtype": the dtype its timesteps were rounded to in training (`cfg.timestep_dtype`)}."""
    dit = {field: getattr(cfg, field) for field in ARCHITECTURE}
    return {"dit": {**dit, "patch_size": list(cfg.patch_size)}, "flow_shift": shift,
            "timestep_dtype": cfg.timestep_dtype}


def trained_timestep_dtype(record: dict | None) -> str:
    """The timestep dtype weights were trained with: their record's; bfloat16 without a record (the
    official releases: ReCamMaster's training casts timesteps to bf16); float32 for a record written
    before the field existed (recam_jax trained in float32 then)."""
    if record is None:
        return "bfloat16"
    return record["timestep_dtype"] or "float32"


def _record_location(path: str) -> str:
    return storage.join(path, RECORD_FILE) if storage.isdir(path) or _is_diffusers_dir(path) else path + RECORD_SUFFIX


def read_model_record(path: str) -> dict | None:
    """The model record written with the weights at `path` (see `model_record`), or None if they have none."""
    if path.endswith(".safetensors") and storage.isfile(path):
        text = torch_io.open_state_dict(path).metadata.get(RECORD_KEY)
        if text is not None:
            return _parse_record(text, f"{path} (header metadata '{RECORD_KEY}')")
    location = _record_location(path)
    legacy = storage.join(path, LEGACY_CONFIG_FILE)
    if not storage.exists(location) and storage.exists(legacy):
        return _parse_record(json.dumps({"dit": storage.read_json(legacy), "flow_shift": None}), legacy)
    if not storage.exists(location):
        return None
    with storage.open(location) as f:
        return _parse_record(f.read(), location)


def _parse_record(text: str, source: str) -> dict:
    try:
        record = json.loads(text)
        dit = {"camera_encoding": "official", **record["dit"]}  # records written before encodings existed
        dit = {field: dit[field] for field in ARCHITECTURE}
        shift = record["flow_shift"]
        timestep_dtype = record.get("timestep_dtype")  # absent from records written before it
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not a recam_jax model record (missing or bad {e})") from e
    return {"dit": {**dit, "patch_size": tuple(dit["patch_size"])}, "flow_shift": shift, "timestep_dtype": timestep_dtype}


def _write_record(record: dict, location: str) -> None:
    storage.write_json(location, record)


def check_record(cfg: DiTConfig, record: dict | None, source: str, other: str = "asked for") -> None:
    """Refuses a config (`other`: where it comes from) that contradicts the record of the weights.

    Official-encoding weights fit any camera encoding: the encoding's extra module starts at zero."""
    if record is None:
        return
    fits = lambda field, value: field == "camera_encoding" and value == "official"
    wrong = [f"{field}: the record says {value}, {other} {getattr(cfg, field)}" for field, value in record["dit"].items()
             if tuple(np.atleast_1d(value)) != tuple(np.atleast_1d(getattr(cfg, field))) and not fits(field, value)]
    if wrong:
        raise CheckpointError(f"{source}: the weights were saved as a different model; " + "; ".join(wrong))


# --- the model size from the tensor shapes ----------------------------------------------------------

# Where each size shows in the tensor shapes (official names, axis): every tensor that shows it votes,
# so one wrong-shaped tensor is outvoted and then reported by itself. out_channels = out_dim·prod(patch).
_GLOBAL_SPOTS = {
    "dim": [("patch_embedding.weight", 0), ("patch_embedding.bias", 0), ("text_embedding.0.weight", 0),
            ("text_embedding.2.weight", 0), ("text_embedding.2.weight", 1), ("time_embedding.0.weight", 0),
            ("time_embedding.2.weight", 0), ("time_embedding.2.weight", 1), ("time_projection.1.weight", 1),
            ("head.head.weight", 1), ("head.modulation", 2)],
    "in_dim": [("patch_embedding.weight", 1)],
    "text_dim": [("text_embedding.0.weight", 1)],
    "freq_dim": [("time_embedding.0.weight", 1)],
    "out_channels": [("head.head.weight", 0), ("head.head.bias", 0)],
}
_BLOCK_SPOTS = {
    "dim": [("modulation", 2), ("norm3.weight", 0), ("self_attn.q.weight", 1), ("self_attn.o.weight", 0),
            ("cross_attn.q.weight", 1), ("cross_attn.o.weight", 0), ("ffn.0.weight", 1), ("ffn.2.weight", 0)],
    "ffn_dim": [("ffn.0.weight", 0), ("ffn.0.bias", 0), ("ffn.2.weight", 1)],
}
# The released Wan2.1 text-to-video sizes, recognised without a record.
OFFICIAL_SIZES = {name: DiTConfig(**VARIANTS[name]) for name in ("1.3B", "14B")}


def _vote(field: str, readings: list[tuple[str, int]], source: str) -> int:
    """The value most tensors show for `field`; a tie is refused, naming the tensors."""
    if not readings:
        raise CheckpointError(f"{source}: cannot read {field} from the tensor shapes: none of its tensors is present")
    (value, votes), *others = collections.Counter(v for _, v in readings).most_common()
    if others and others[0][1] == votes:
        raise CheckpointError(f"{source}: the tensors disagree on {field}: " +
                              ", ".join(f"{name} says {v}" for name, v in readings))
    return value


def _read_sizes(shapes: Mapping[str, tuple], name, source: str) -> dict:
    """The architecture sizes shown by the tensor shapes (`name`: official name → name in the file)."""
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    spots = collections.defaultdict(list, {f: list(s) for f, s in _GLOBAL_SPOTS.items()})
    for i in sorted(blocks):
        for field, block_spots in _BLOCK_SPOTS.items():
            spots[field] += [(f"blocks.{i}.{key}", axis) for key, axis in block_spots]
    readings = {field: [(name(t), shapes[name(t)][axis]) for t, axis in where
                        if name(t) in shapes and len(shapes[name(t)]) > axis] for field, where in spots.items()}
    patch_shape = shapes.get(name("patch_embedding.weight"), ())
    if len(patch_shape) != 5 or not blocks:
        raise CheckpointError(f"{source}: cannot read the model size: expected a 5-d 'patch_embedding.weight' "
                              f"and 'blocks.N.*' tensors, found {name('patch_embedding.weight')} {patch_shape}, "
                              f"{len(blocks)} blocks")
    sizes = {field: _vote(field, r, source) for field, r in readings.items()}
    patch = tuple(int(p) for p in patch_shape[2:])
    sizes["out_dim"] = sizes.pop("out_channels") // int(np.prod(patch))
    return {**sizes, "patch_size": patch, "num_layers": max(blocks) + 1}


def infer_config(shapes: Mapping[str, tuple], num_heads: int | None = None, record: dict | None = None,
                 source: str = "checkpoint", **overrides) -> DiTConfig:
    """The DiT a checkpoint holds: sizes read off its tensor shapes, the head count from `num_heads`,
    else from its model `record`, else from the official Wan2.1 size it matches; anything else is refused."""
    layout = detect_layout(shapes)
    table = {w.wan: w.diffusers for encoding in camera_encoding.ENCODINGS
             for w in weight_table(DiTConfig(1, 1, 1, 1, camera_encoding=encoding))}
    name = (lambda wan: _diffusers_name(wan, table)) if layout == "diffusers" else (lambda wan: wan)
    sizes = _read_sizes(shapes, name, source)
    if record is not None:
        fields = {**record["dit"], **sizes}
        check_record(DiTConfig(**fields), record, source, other="the tensor shapes say")
        fields.update(num_heads=num_heads or record["dit"]["num_heads"])
        check_record(DiTConfig(**fields), record, source)
    else:
        fields = {**sizes, "num_heads": num_heads or _official_heads(sizes, source),
                  "camera_encoding": _camera_encoding_of(shapes, name)}
    if fields["dim"] % fields["num_heads"]:
        raise CheckpointError(f"{source}: dim {fields['dim']} does not split into {fields['num_heads']} heads")
    return DiTConfig(**{**fields, **overrides})


def _camera_encoding_of(shapes: Mapping[str, tuple], name) -> str:
    """The camera encoding whose extra module block 0 holds ('official' when none)."""
    held = [encoding for encoding, (module, _) in camera_encoding.EXTRA_MODULES.items()
            if name(f"blocks.0.{module}.weight") in shapes]
    return held[0] if held else "official"


def _diffusers_name(wan: str, table: Mapping[str, str]) -> str:
    """The diffusers name of an official name (block tensors through block 0's names)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", wan)
    if m is None:
        return table[wan]
    return re.sub(r"^blocks\.0\.", f"blocks.{m.group(1)}.", table[f"blocks.0.{m.group(2)}"])


def _official_heads(sizes: dict, source: str) -> int:
    for name, official in OFFICIAL_SIZES.items():
        if all(sizes[field] == getattr(official, field) for field in SIZES):
            return official.num_heads
    shown = ", ".join(f"{field}={sizes[field]}" for field in SIZES)
    raise CheckpointError(
        f"{source}: the number of attention heads is not in the weights, and they have no model record "
        f"('{RECORD_KEY}' in a .safetensors header, FILE{RECORD_SUFFIX} beside a file, {RECORD_FILE} in a "
        f"folder). Their size ({shown}) is no official Wan2.1 size ({', '.join(OFFICIAL_SIZES)}): pass the "
        f"head count, --num_heads N (recam_jax.convert, recam_jax.sample) or num_heads=N.")


# --- tensors by official name, loaded one at a time --------------------------------------------------

def abstract_model(cfg: DiTConfig) -> WanDiT:
    """The model's structure and shapes, nothing allocated."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def _per_block(cfg: DiTConfig) -> DiTConfig:
    """The layout `weight_table` names: one entry per block, ("blocks", i, ...)."""
    return dataclasses.replace(cfg, scan_layers=False)


@dataclasses.dataclass(frozen=True)
class _BlockRow:
    """Block `index` of a weight stacked on the `layers` axis, read like that block's own variable."""

    stacked: nnx.Variable
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self):
        return self.stacked.dtype

    def __getitem__(self, key):
        return self.stacked[...][self.index][key]


def _param_state(model: WanDiT) -> tuple[nnx.State, dict]:
    """The model's params and their variables by Flax path ("blocks", i, ...), as `weight_table` names
    them: the one place the converter touches the model's state. A scanned model's stacked block
    weights are read row by row (`_BlockRow`); models to be written are built per block (`_per_block`)."""
    state = nnx.state(model, nnx.Param)
    flat = dict(state.flat_state())
    if not model.cfg.scan_layers:
        return state, flat
    by_block = {}
    for path, variable in flat.items():
        if path[0] == "blocks":
            by_block.update({("blocks", i, *path[1:]): _BlockRow(variable, i) for i in range(model.cfg.num_layers)})
        else:
            by_block[path] = variable
    return state, by_block


def with_block_layout(model: WanDiT, scan_layers: bool) -> WanDiT:
    """The same weights with the blocks stacked on a `layers` axis (scan_layers) or one per block.

    The PyTorch names address blocks one by one (`blocks.N.…` ⇄ path ("blocks", N, …)); a scanned
    model holds ("blocks", …) with N as the leading axis. Numpy weights stay numpy.
    """
    if model.cfg.scan_layers == scan_layers:
        return model
    target = abstract_model(dataclasses.replace(model.cfg, scan_layers=scan_layers))
    source = {path: v[...] for path, v in nnx.state(model, nnx.Param).flat_state()}
    state = nnx.state(target, nnx.Param)
    for path, variable in state.flat_state():
        if path[0] != "blocks":
            value = source[path]
        elif scan_layers:  # ("blocks", …) ← ("blocks", N, …) for every N
            per_block = [source.pop(("blocks", n, *path[1:])) for n in range(model.cfg.num_layers)]
            value = (np if isinstance(per_block[0], np.ndarray) else jnp).stack(per_block)
        else:  # ("blocks", N, …) ← row N of ("blocks", …)
            value = source[("blocks", *path[2:])][path[1]]
        variable.set_value(value)
    nnx.update(target, state)
    return target


def pytorch_tensors(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig, source: str) -> dict[str, LazyTensor]:
    """The checkpoint's tensors (any layout) by official name, in PyTorch layout, checked against `cfg`
    (every missing, unexpected or wrong-shaped tensor is listed); a camera module absent from the
    checkpoint (in every block) comes at its official or zero init, in the checkpoint's dtype."""
    layout = detect_layout(state_dict)
    name_of = (lambda w: w.diffusers) if layout == "diffusers" else (lambda w: w.wan)
    _, flat = _param_state(abstract_model(_per_block(cfg)))
    table = weight_table(cfg)
    held = {w.path[-2] for w in table if _is_camera(w) and name_of(w) in state_dict}  # each all or nothing
    if held & {"cam_encoder", "projector"}:  # ReCamMaster's two come together
        held |= {"cam_encoder", "projector"}
    shapes = {w.wan: _torch_shape(flat[w.path].shape, w.kind) for w in table}
    expected = {name_of(w): shapes[w.wan] for w in table if not _is_camera(w) or w.path[-2] in held}
    found = getattr(state_dict, "shapes", None) or {k: tuple(v.shape) for k, v in state_dict.items()}
    torch_io.check_names_and_shapes(source, expected, found)
    lazy = getattr(state_dict, "lazy", None) or (lambda key: LazyTensor.of(np.asarray(state_dict[key])))
    tensors = {w.wan: lazy(name_of(w)) for w in table if name_of(w) in expected}
    dtype = tensors["patch_embedding.weight"].dtype
    for w in table:
        if w.wan not in tensors:  # a camera module the checkpoint lacks
            init = CAMERA_INIT[w.path[-2]] if w.path[-1] == "kernel" else nnx.initializers.zeros
            tensors[w.wan] = LazyTensor(shapes[w.wan], dtype, lambda w=w, init=init: to_torch_layout(
                np.asarray(init(None, flat[w.path].shape, dtype)), w.kind))
    return {w.wan: tensors[w.wan] for w in table}


def model_tensors(model: WanDiT, dtype=None) -> dict[str, LazyTensor]:
    """The model's weights by official name, in PyTorch layout, each gathered when loaded.

    In a multi-host job loading is a collective: every process must load the same tensors in order."""
    _, flat = _param_state(model)
    tensors = {}
    for w in weight_table(model.cfg):
        variable = flat[w.path]
        out_dtype = np.dtype(jnp.dtype(dtype or variable.dtype))
        tensors[w.wan] = LazyTensor(_torch_shape(variable.shape, w.kind), out_dtype, lambda v=variable, w=w, d=out_dtype:
                                    to_torch_layout(_whole_on_host(v[...]).astype(d, copy=False), w.kind))
    return tensors


def _whole_on_host(array) -> np.ndarray:
    """The whole array in this host's memory; an array sharded over several hosts is gathered
    (a collective: every process must make the same calls)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _cast(tensors: Mapping[str, LazyTensor], dtype) -> dict[str, LazyTensor]:
    dtype = np.dtype(jnp.dtype(dtype))
    return {k: LazyTensor(t.shape, dtype, lambda t=t: t.load().astype(dtype)) for k, t in tensors.items()}


def _model_from_tensors(tensors: Mapping[str, LazyTensor], cfg: DiTConfig, on_host: bool) -> WanDiT:
    model = abstract_model(_per_block(cfg))
    state, flat = _param_state(model)
    to_array = np.asarray if on_host else jnp.asarray
    for w in weight_table(cfg):
        variable = flat[w.path]
        variable.set_value(to_array(to_flax_layout(tensors[w.wan].load(), w.kind), dtype=variable.dtype))
    nnx.update(model, state)
    return with_block_layout(model, cfg.scan_layers)


def import_weights(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig, source: str = "checkpoint",
                   on_host: bool = False) -> WanDiT:
    """A Flax model holding the weights of a PyTorch state dict (any layout), tensor by tensor.

    The checkpoint must match `cfg` exactly (see `pytorch_tensors`). With `on_host` the weights stay
    numpy arrays in host memory, for the caller to place shard by shard (a 14B model does not fit on
    the one default device).
    """
    return _model_from_tensors(pytorch_tensors(state_dict, cfg, source), cfg, on_host)


def export_weights(model: WanDiT, layout: str = "recammaster", dtype=None) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state dict in memory ('recammaster' or 'diffusers')."""
    return {name: t.load() for name, t in _named(model_tensors(model, dtype), model.cfg, layout).items()}


def _named(tensors: Mapping[str, LazyTensor], cfg: DiTConfig, layout: str) -> dict[str, LazyTensor]:
    """The tensors under their names in `layout`: 'recammaster' (official names) or 'diffusers'."""
    if layout not in ("recammaster", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}")
    return {(w.diffusers if layout == "diffusers" else w.wan): tensors[w.wan] for w in weight_table(cfg)}


# --- files: PyTorch checkpoints, diffusers folders, orbax folders ---------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _is_torch_path(path: str) -> bool:
    """A PyTorch file, a diffusers folder, or a folder of (sharded) safetensors such as Wan's releases."""
    if storage.isdir(path) and any(f.endswith((".safetensors", ".safetensors.index.json")) for f in storage.listdir(path)):
        return True
    return path.endswith((".safetensors", ".index.json", *torch_io.PICKLE_SUFFIXES)) or _is_diffusers_dir(path)


def _is_diffusers_dir(path: str) -> bool:
    return storage.basename(path).endswith("diffusers") or storage.exists(storage.join(path, DIFFUSERS_WEIGHTS))


def open_pytorch(path: str, cfg: DiTConfig | None = None, num_heads: int | None = None, **overrides,
                 ) -> tuple[DiTConfig, dict[str, LazyTensor], dict | None]:
    """(config, lazy tensors by official name, model record) of any PyTorch DiT checkpoint."""
    state_dict = torch_io.open_state_dict(path)
    record = read_model_record(path)
    if cfg is None:
        cfg = infer_config(state_dict.shapes, num_heads=num_heads, record=record, source=path, **overrides)
    check_record(cfg, record, path)
    return cfg, pytorch_tensors(state_dict, cfg, source=path), record


def load_pytorch(path: str, cfg: DiTConfig | None = None, num_heads: int | None = None, on_host: bool = False,
                 **overrides) -> WanDiT:
    """A Flax model from any PyTorch DiT checkpoint (file, sharded index or folder, diffusers folder).

    With `cfg` the checkpoint must match it; without, see `infer_config`. `on_host`: as in `import_weights`.
    """
    cfg, tensors, _ = open_pytorch(path, cfg, num_heads, **overrides)
    return _model_from_tensors(tensors, cfg, on_host)


def save_pytorch(model: WanDiT, path: str, dtype=None, shift: float | None = None) -> None:
    """Writes `.ckpt`/`.pth` or `.safetensors` (recammaster layout) or a diffusers folder, with the
    model record (`shift`: the flow shift it was trained with). Tensors are gathered one at a time.

    In a multi-host job every process calls it (the weights are gathered) and the first one writes.
    """
    tensors = model_tensors(model, dtype)
    if jax.process_index() != 0:
        for tensor in tensors.values():  # the same gathers as the writer's, in the same order
            tensor.load()
        return
    write_pytorch(tensors, model.cfg, path, shift)


def write_pytorch(tensors: Mapping[str, LazyTensor], cfg: DiTConfig, path: str, shift: float | None = None) -> None:
    """Writes tensors (official names) as `save_pytorch` does, one at a time, and their model record."""
    record = model_record(cfg, shift)
    if path.endswith(torch_io.PICKLE_SUFFIXES) and cfg.camera_encoding != "official":
        raise ValueError(f"{path}: the official ReCamMaster .ckpt layout has no place for the "
                         f"camera_encoding={cfg.camera_encoding!r} modules, and its inference code would drop "
                         f"them; write a .safetensors file, a diffusers folder or a recam_jax params folder")
    if path.endswith(".safetensors"):
        torch_io.save_state_dict(_named(tensors, cfg, "recammaster"), path, {RECORD_KEY: json.dumps(record)})
    elif path.endswith(torch_io.PICKLE_SUFFIXES):
        torch_io.save_state_dict(_named(tensors, cfg, "recammaster"), path)
        _write_record(record, _record_location(path))
    else:
        torch_io.save_state_dict(_named(tensors, cfg, "diffusers"), storage.join(path, DIFFUSERS_WEIGHTS))
        storage.write_json(storage.join(path, "config.json"), diffusers_config(cfg))
        _write_record(record, storage.join(path, RECORD_FILE))


def diffusers_config(cfg: DiTConfig) -> dict:
    """The `WanTransformer3DModel` config of the same model (camera modules are extra weights)."""
    return dict(_class_name="WanTransformer3DModel", patch_size=list(cfg.patch_size), num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps)


def save_orbax(model: WanDiT, path: str, shift: float | None = None) -> None:
    """Params as an orbax checkpoint plus the model record next to them; a scanned model's block
    weights, stacked on a leading `layers` axis, are stored one block per chunk (`_one_block_per_chunk`)."""
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.join(path, "params"), params, save_args=_one_block_per_chunk(params))
    if jax.process_index() == 0:
        _write_record(model_record(model.cfg, shift), storage.join(path, RECORD_FILE))


def _one_block_per_chunk(params: nnx.State):
    """orbax's save args of each param: the stacked block weights of a scanned model (under "blocks",
    their leading axis the layers) split into chunks of one block each, other params as orbax chooses.

    tensorstore decodes whole chunks: stacked weights saved from one device in one chunk each made
    every block's row read (`orbax_tensors`) decode all the blocks, and a scanned folder convert 3×
    slower than a per-block one (benchmarks/RESULTS.md). `shard_axes` is orbax's axis to split first;
    with no chunk byte size it splits it down to 1. A per-block model has no stacked weights."""
    import orbax.checkpoint as ocp

    def args(path, value):
        stacked = path[0].key == "blocks" and not isinstance(path[1].key, int)  # ("blocks", n, ...): per block
        return ocp.SaveArgs(shard_axes=(0,) if stacked and np.ndim(value) else ())
    return jax.tree_util.tree_map_with_path(args, params)


def _orbax_record(path: str) -> dict:
    record = read_model_record(path) if storage.isdir(path) else None
    if record is None:
        raise CheckpointError(f"{path}: not a recam_jax params folder (no {RECORD_FILE}) nor a PyTorch checkpoint "
                              f"(no .safetensors, *.safetensors.index.json or {'/'.join(torch_io.PICKLE_SUFFIXES)})")
    return record


def _saved_tree(params_dir: str):
    """orbax's metadata of the tree saved in an orbax folder: a leaf per array, and the zarr version."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.metadata(params_dir).item_metadata


def _flax_path(array_name: str) -> tuple:
    """The Flax path of an array saved from an `nnx.State`: "blocks.0.self_attn.q.kernel.value" →
    ("blocks", 0, "self_attn", "q", "kernel")."""
    return tuple(int(k) if k.isdigit() else k for k in array_name.removesuffix(".value").split("."))


def stored_param_shapes(params_dir: str) -> dict[tuple, jax.ShapeDtypeStruct]:
    """The shape and dtype of every param an orbax folder of an `nnx.State` holds, by Flax path:
    ("blocks", 0, "self_attn", ...) or, for blocks stacked on a `layers` axis, ("blocks", "self_attn", ...)."""
    return {_flax_path(m.name): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
            for m in jax.tree.leaves(_saved_tree(params_dir).tree)}


def _is_scanned(stored: Mapping[tuple, jax.ShapeDtypeStruct]) -> bool:
    return not any(path[:2] == ("blocks", 0) for path in stored)


def _restore_orbax(path: str, cfg: DiTConfig, on_host: bool) -> WanDiT:
    """The params under `path`/params into a `cfg` model, cast to cfg.param_dtype (numpy arrays with `on_host`)."""
    import orbax.checkpoint as ocp

    params_dir = storage.join(path, "params")
    # Folders hold the layout they were saved from: one entry per block, or the blocks stacked.
    model = abstract_model(dataclasses.replace(cfg, scan_layers=_is_scanned(stored_param_shapes(params_dir))))
    abstract_params = nnx.state(model, nnx.Param)
    for _, variable in abstract_params.flat_state():
        # numpy targets make orbax restore numpy arrays (np.empty: pages are only touched by the read)
        variable.set_value(np.empty(variable.shape, variable.dtype) if on_host
                           else jax.ShapeDtypeStruct(variable.shape, variable.dtype))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(params_dir, abstract_params)
    nnx.update(model, params)
    return with_block_layout(model, cfg.scan_layers)


def _stored_arrays(params_dir: str):
    """`open(path)`: the tensorstore array of the param at a Flax path of an orbax folder (nothing read).

    orbax restores whole arrays; its storage layer, tensorstore, reads a slice, and orbax builds the
    tensorstore spec of each array."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    saved, directory = _saved_tree(params_dir), epath.Path(params_dir)
    names = {_flax_path(m.name): m.name for m in jax.tree.leaves(saved.tree)}
    ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)  # one for all reads: OCDBT caches shared

    def open_array(path: tuple):
        info = ocp.type_handlers.ParamInfo(name=names[path], parent_dir=directory, use_zarr3=saved.use_zarr3)
        return ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt), context=context).result()

    return open_array


def _stored_array_reader(params_dir: str):
    """`read(path, index)`: the slice `index` of the param at a Flax path of an orbax folder, as a numpy
    array in its stored dtype, read alone.

    tensorstore reads and decodes the chunks that hold the slice: `save_orbax` stores a block of
    stacked weights per chunk, so a block's row is read by itself; in folders written before (each
    array from one device one chunk) each row decodes the whole stacked weight once more. Memory
    holds one stacked weight at most instead of them all."""
    open_array = _stored_arrays(params_dir)
    return lambda path, index=(): open_array(path)[index].read().result()


def orbax_tensors(path: str, cfg: DiTConfig) -> dict[str, LazyTensor]:
    """The params of a recam_jax orbax folder by official name, in PyTorch layout and the dtypes they
    were stored in, each read when loaded, alone: a block's tensor in a folder saved from a scanned
    model is its row of the stacked array (`_stored_array_reader`)."""
    params_dir = storage.join(path, "params")
    stored = stored_param_shapes(params_dir)
    scanned, read = _is_scanned(stored), _stored_array_reader(params_dir)

    def where(w: Weight) -> tuple[tuple, tuple]:  # the stored array holding w, and w's index in it
        if scanned and w.path[0] == "blocks":  # ("blocks", n, ...) is row n of ("blocks", ...)
            return ("blocks", *w.path[2:]), (w.path[1],)
        return w.path, ()

    _, flat = _param_state(abstract_model(_per_block(cfg)))
    return {w.wan: LazyTensor(_torch_shape(flat[w.path].shape, w.kind), np.dtype(stored[where(w)[0]].dtype),
                              lambda w=w: to_torch_layout(read(*where(w)), w.kind)) for w in weight_table(cfg)}


def load_orbax(path: str, cfg: DiTConfig | None = None, on_host: bool = False, **overrides) -> WanDiT:
    """The model saved by `save_orbax` (numerics overridable; with `cfg`, that config, checked against
    the record). `on_host`: the weights are restored as numpy arrays in host memory, as in `import_weights`."""
    path = storage.absolute(path)
    record = _orbax_record(path)
    if cfg is None:
        cfg = DiTConfig(**{**record["dit"], **overrides})
    check_record(cfg, record, path)
    return _restore_orbax(path, cfg, on_host)


def load_any(path: str, cfg: DiTConfig | None = None, num_heads: int | None = None, on_host: bool = False,
             **overrides) -> WanDiT:
    """A model from a PyTorch checkpoint or a recam_jax orbax folder (`on_host`: numpy weights)."""
    if _is_torch_path(path):
        return load_pytorch(path, cfg, num_heads=num_heads, on_host=on_host, **overrides)
    return load_orbax(path, cfg, on_host=on_host, **overrides)


def convert(source: str, target: str, num_heads: int | None = None, dtype=None) -> None:
    """Any supported format to any other, one tensor at a time, keeping each tensor's dtype (unless
    `dtype`) and carrying the model record over.

    PyTorch → PyTorch holds about one tensor (each is copied out of the mapped input and its pages
    handed back, `torch_io._MappedFile`); from orbax the params are read one tensor at a time, a
    block's row of a stacked array alone (`orbax_tensors`); to orbax they are loaded (and cast) up
    to 64 MB at a time, each batch written before the next (`_save_orbax_tensors`)."""
    if _is_torch_path(source):
        cfg, tensors, record = open_pytorch(source, num_heads=num_heads)
    else:
        record = _orbax_record(storage.absolute(source))
        cfg = DiTConfig(**record["dit"])
        tensors = orbax_tensors(storage.absolute(source), cfg)
    shift = record["flow_shift"] if record else None
    cfg = dataclasses.replace(cfg, timestep_dtype=trained_timestep_dtype(record))  # the record carries it over
    if dtype is not None:
        tensors = _cast(tensors, dtype)
    if _is_torch_path(target):
        write_pytorch(tensors, cfg, target, shift)
    else:
        _save_orbax_tensors(tensors, cfg, target, shift)


ORBAX_DATA_FILE_BYTES = 4 * 2**20  # measured in benchmarks/convert_memory.py: larger files cost more memory
# Tensors written to orbax together, one OCDBT commit per batch: a commit per tensor doubled the time
# of ckpt → orbax, and a larger batch holds more cast copies (benchmarks/convert_memory.py).
ORBAX_WRITE_BATCH_BYTES = 64 * 2**20


def _batches(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes add up to at most `budget` (a larger
    size alone)."""
    batches, total = [], 0
    for i, size in enumerate(sizes):
        if not batches or total + size > budget:
            batches.append([])
            total = 0
        batches[-1].append(i)
        total += size
    return batches


def _lazy_tensor_handler():
    """orbax's numpy array handler for `LazyTensor` leaves, loading them a batch at a time
    (`ORBAX_WRITE_BATCH_BYTES`) and writing each batch before the next is loaded: orbax hands a
    handler all its leaves at once and writes them together, so arrays made for the save (cast
    copies) would all be held until its end.

    A write is the numpy handler's own (`_background_serialize`, not public: orbax is pinned below
    0.13), without its copy of the arrays. Each batch is committed by itself, so the OCDBT driver
    gets no B-tree node cache: orbax's (up to 100 MB) keeps the nodes of every commit."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class LazyTensorHandler(ocp.type_handlers.NumpyHandler):
        async def serialize(self, values, infos, args):  # orbax's tree handler gives each value its SaveArgs
            context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 0}},  # orbax's, less the cache
                                 ocp.type_handlers.get_ts_context(use_ocdbt=False))
            for info in infos:
                info.ts_context = context  # in place of the one orbax made for this save
            sizes = [int(np.prod(value.shape)) * value.dtype.itemsize for value in values]

            async def in_batches():
                for batch in _batches(sizes, ORBAX_WRITE_BATCH_BYTES):
                    await self._background_serialize([values[i].load() for i in batch], [infos[i] for i in batch],
                                                     [args[i] for i in batch])
            return [ocp.future.CommitFutureAwaitingContractedSignals(in_batches(), name="lazy_tensor_handler")]

    return LazyTensorHandler()


def _save_orbax_tensors(tensors: Mapping[str, LazyTensor], cfg: DiTConfig, path: str, shift: float | None) -> None:
    """`save_orbax` of the model holding `tensors`, in their own dtypes, in the same format, loaded
    and written a batch at a time (`_lazy_tensor_handler`), in small data files (OCDBT keeps the
    files being written in memory)."""
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    state, flat = _param_state(abstract_model(_per_block(cfg)))  # read back in either layout (`_restore_orbax`)
    for w in weight_table(cfg):
        tensor = tensors[w.wan]
        flat[w.path].set_value(LazyTensor(flat[w.path].shape, tensor.dtype,
                                          lambda t=tensor, w=w: to_flax_layout(t.load(), w.kind)))
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyTensor, _lazy_tensor_handler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()))  # unused here; orbax warns without one
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.save(storage.join(path, "params"),
                          args=ocp.args.PyTreeSave(state, ocdbt_target_data_file_size=ORBAX_DATA_FILE_BYTES))
    _write_record(model_record(cfg, shift), storage.join(path, RECORD_FILE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="PyTorch checkpoint or folder of shards, diffusers folder, or recam_jax orbax folder")
    parser.add_argument("output", help=".ckpt/.pth or .safetensors (ReCamMaster), *diffusers folder, or orbax folder")
    parser.add_argument("--num_heads", "--num-heads", type=int, default=None,
                        help="attention heads, for weights with no model record that are no official Wan2.1 size")
    parser.add_argument("--dtype", default=None, help="dtype of the written tensors (default: as stored)")
    args = parser.parse_args(argv)
    convert(args.input, args.output, num_heads=args.num_heads, dtype=args.dtype)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
