"""The main job: train ReCamMaster.

    python -m recam_jax.train --config configs/base.py --workdir DIR [--config.key=value ...]

Sections in order: mesh → data → abstract state → shardings → step → init or restore → loop.
The loop is init or restore → for step: batch → step → log → maybe eval → maybe checkpoint, and
restarting with the same workdir resumes from the latest checkpoint (SIGTERM saves one first).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from data_pipeline import loader
from recam_jax import checkpoint, convert, flops, flow, optim, profiling, sharding, storage, train_samples
from recam_jax import evaluate as evaluate_lib
from recam_jax.batch import batch_spec
from recam_jax.metrics import MetricWriter
from recam_jax.models import camera_encoding
from recam_jax.models.attention import BACKENDS, SplashBlocks
from recam_jax.models.dit import REMAT_POLICIES, VARIANTS, WanDiT, dit_config
from recam_jax.synthetic import synthetic_dataset


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved in every checkpoint but `frozen`, written once per run."""

    step: jax.Array
    rng: jax.Array  # raw key data of the run's step-key stream; each step folds in its step number
    trainable: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    ema: nnx.State | None
    skipped_nonfinite: jax.Array
    first_nonfinite_step: jax.Array  # 0 until a step's loss or gradient is non-finite, then that step


# --- configuration --------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict):
    c = config.model
    return dit_config(c.variant, dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat, attention=c.attention,
                      splash_blocks=SplashBlocks(**c.splash_blocks), scan_layers=c.scan_layers,
                      timestep_dtype=c.timestep_dtype, text_dim=config.data.text_dim, camera_encoding=c.camera_encoding)


def flow_config(config: ml_collections.ConfigDict) -> flow.FlowConfig:
    return flow.FlowConfig(**{**config.flow.to_dict(), "condition_noise": tuple(config.flow.condition_noise)})


DATA_SOURCES = ("synthetic", "tfrecord")
DTYPES = ("float32", "bfloat16")

# Every field that names one of a fixed set of things, and that set.
CHOICES = {
    "model.variant": VARIANTS,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMAT_POLICIES,
    "model.attention": BACKENDS,
    "model.timestep_dtype": DTYPES,
    "model.camera_encoding": camera_encoding.ENCODINGS,
    "trainable": optim.TRAINABLE_SETS,
    "flow.timestep_sampling": flow.TIMESTEP_SAMPLINGS,
    "flow.loss_weighting": flow.LOSS_WEIGHTINGS,
    "optimizer.schedule": optim.SCHEDULES,
    "data.source": DATA_SOURCES,
    "sharding_rules": sharding.RULE_SETS,
    "sample.vae": train_samples.DECODERS,
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every field naming a choice, and the cross-field checks, in one place before anything is built."""
    for field, allowed in CHOICES.items():
        value = functools.reduce(getattr, field.split("."), config)
        if value not in allowed:
            raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, allowed))}")
    if config.data.batch_size % config.optimizer.grad_accum_steps:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")
    if config.export_ema and not config.optimizer.ema_decay:
        raise ValueError("export_ema needs optimizer.ema_decay > 0")
    if config.flow.p_t2v + config.flow.p_i2v > 1:
        raise ValueError("flow.p_t2v + flow.p_i2v must be at most 1")


def check_micro_batches(config, data_sharding: NamedSharding) -> None:
    """Each device must hold whole rows of every micro-batch: with fewer rows per device than
    micro-batches the step would all-gather the batch to split it."""
    rows = data_sharding.shard_shape((config.data.batch_size,))[0]
    accum = config.optimizer.grad_accum_steps
    if rows % accum:
        raise ValueError(
            f"optimizer.grad_accum_steps={accum} does not divide the {rows} rows each device holds "
            f"(data.batch_size={config.data.batch_size} over the mesh's batch axes): raise data.batch_size "
            f"or lower optimizer.grad_accum_steps")


# --- mesh and shardings ---------------------------------------------------------------------------


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The config's mesh over `devices` (default: all), across `mesh.num_slices` slices by the dcn_ sizes."""
    devices = jax.devices() if devices is None else devices
    m = config.mesh
    ici = {axis: m[axis] for axis in sharding.MESH_AXES}
    if m.num_slices == 1:
        return sharding.make_mesh(ici, devices=devices)
    if sharding.num_granules(devices) != m.num_slices:
        raise ValueError(f"mesh.num_slices={m.num_slices} but the devices are in {sharding.num_granules(devices)} "
                         "slices (TPU slices; on CPU/GPU, processes)")
    return sharding.make_mesh(ici, dcn_sizes={axis: m[f"dcn_{axis}"] for axis in sharding.MESH_AXES}, devices=devices)


def state_shardings(abstract_state: TrainState, mesh: Mesh, config):
    """NamedShardings of the train state from the parameters' logical axes (moments follow them)."""
    return sharding.param_shardings(abstract_state, mesh, sharding.rules_for(config.sharding_rules))


def check_parameters_sharded(abstract_state: TrainState, shardings, mesh: Mesh, config) -> None:
    """Where the mesh is meant to shard parameters (fsdp or tensor > 1), fail if most are whole."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        params = {"trainable": abstract_state.trainable, "frozen": abstract_state.frozen}
        sharding.check_sufficiently_sharded(params, {"trainable": shardings.trainable, "frozen": shardings.frozen},
                                            config.max_unsharded_fraction)


# --- state ----------------------------------------------------------------------------------------


def split_model(model: WanDiT, trainable: str):
    """(graphdef, trainable params, frozen params)."""
    return nnx.split(model, optim.trainable_filter(trainable), nnx.Param)


def new_state(model: WanDiT, config, tx) -> TrainState:
    """A step-0 train state around a model's parameters."""
    _, trainable, frozen = split_model(model, config.trainable)
    return state_around(trainable, hold_frozen(frozen, config), config, tx)


def hold_frozen(frozen: nnx.State, config) -> nnx.State:
    """The frozen parameters as the state holds them: in the compute dtype with
    `model.frozen_in_compute_dtype` (half the memory and checkpoint bytes of float32 under bf16
    compute; they take no update, so there is no small step to lose), else as they are."""
    if not config.model.frozen_in_compute_dtype:
        return frozen
    return jax.tree.map(lambda x: x.astype(jnp.dtype(config.model.dtype)), frozen)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(parameter-init key, step-key stream) of a run: split apart, so no step's key is an init key."""
    init_key, step_keys = jax.random.split(jax.random.key(seed))
    return init_key, step_keys


def step_key(state: TrainState) -> jax.Array:
    """The key of the step `state` is about to take."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def state_around(trainable, frozen, config, tx) -> TrainState:
    """A step-0 train state around split parameters (fresh moments, EMA = the parameters)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(run_keys(config.seed)[1]),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        ema=jax.tree.map(jnp.copy, trainable) if config.optimizer.ema_decay else None,
        skipped_nonfinite=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.zeros((), jnp.int32),
    )


def model_from_state(graphdef, state: TrainState, use_ema: bool = False) -> WanDiT:
    return nnx.merge(graphdef, state.ema if use_ema else state.trainable, state.frozen)


# --- the step -------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, *, graphdef, tx, flow_cfg, accum_steps: int, ema_decay: float,
               learning_rate) -> tuple[TrainState, dict]:
    """One optimizer step over `accum_steps` micro-batches. A non-finite loss or gradient leaves the
    parameters, moments and EMA unchanged, is counted, and the first such step is recorded.
    `learning_rate(opt_state)` is the rate the update applies (logged)."""

    def loss_fn(trainable, micro_batch, example_keys):
        model = nnx.merge(graphdef, trainable, state.frozen)
        loss, aux = flow.flow_loss(model, example_keys, micro_batch, flow_cfg)
        return loss, flow.loss_breakdown(aux["per_example"], aux["sigma"], aux["task"])

    def accumulate(carry, inputs):
        grad_sum, loss_sum, breakdown_sum = carry
        (loss, breakdown), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, *inputs)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (add(grad_sum, grads), loss_sum + loss, add(breakdown_sum, breakdown)), None

    # One key per example: its noise is the same however the batch is split into micro-batches.
    example_keys = jax.random.split(step_key(state), batch["target_latents"].shape[0])
    # (batch, ...) → (accum, batch/accum, ...) keeping each device's rows in its own micro-batch shard.
    split = lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    no_breakdown = flow.loss_breakdown(jnp.zeros(0), jnp.zeros(0), jnp.zeros(0, jnp.int32))  # of no example: zeros
    (grads, loss, breakdown), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), no_breakdown),
                                               (jax.tree.map(split, batch), split(example_keys)))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = loss / accum_steps
    grad_norm = optax.global_norm(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    ema = state.ema
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, trainable)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        trainable=keep(trainable, state.trainable),
        opt_state=keep(opt_state, state.opt_state),
        ema=keep(ema, state.ema),
        skipped_nonfinite=state.skipped_nonfinite + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where((state.first_nonfinite_step == 0) & ~finite, state.step + 1,
                                       state.first_nonfinite_step),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate(state.opt_state),
               "finite": finite, "skipped_nonfinite": new_state.skipped_nonfinite, "breakdown": breakdown}
    return new_state, metrics


def eval_metrics(state: TrainState, batch: dict, *, graphdef, flow_cfg, use_ema: bool = False) -> dict:
    """Validation loss at each example's fixed timestep and noise seed (comparable across runs), with the
    true and with shuffled cameras (`evaluate.camera_sensitivity`), of the raw or the EMA weights."""
    return evaluate_lib.camera_sensitivity(model_from_state(graphdef, state, use_ema), batch, flow_cfg)


# --- data -----------------------------------------------------------------------------------------


def batch_rows(config, data_sharding: NamedSharding) -> dict[int, np.ndarray]:
    """The global batch rows each process loads: those its devices hold under the batch sharding."""
    return sharding.process_rows(data_sharding, config.data.batch_size)


def make_data_iterator(config, data_sharding: NamedSharding, *, split: str = "train"):
    """This host's checkpointable iterator of its rows of the global batches (`batch_rows`): endless
    for "train", one pass for "eval". The global batches do not depend on the number of processes."""
    rows = batch_rows(config, data_sharding)[jax.process_index()]
    if config.data.source == "synthetic":
        return iter(synthetic_dataset(
            num_examples=config.data.synthetic_examples, batch_size=config.data.batch_size, rows=rows,
            latent_shape=tuple(config.data.latent_shape), text_len=config.data.text_len,
            text_dim=config.data.text_dim, seed=config.seed, for_eval=split == "eval"))
    if config.data.source == "tfrecord":
        if split == "eval":
            return loader.make_eval_iterator(config.data.path, batch_size=config.data.batch_size, rows=rows,
                                             text_len=config.data.text_len,
                                             pairs_per_scene=config.data.eval_pairs_per_scene)
        return loader.make_train_iterator(config.data.path, batch_size=config.data.batch_size, rows=rows,
                                          text_len=config.data.text_len, seed=config.seed,
                                          worker_count=config.data.worker_count, skip_corrupt=config.data.skip_corrupt)
    raise ValueError(f"data.source={config.data.source!r} is not 'synthetic' or 'tfrecord'")


def to_global(batch: dict, data_sharding: NamedSharding, config) -> dict:
    """Assembles this host's rows (`make_data_iterator`) into one global array per key."""
    rows = batch_rows(config, data_sharding)[jax.process_index()]
    return sharding.global_batch(batch, data_sharding, rows, config.data.batch_size)


# --- the job --------------------------------------------------------------------------------------


class Preemption:
    """A SIGTERM (preemption notice) makes the loop save at a step and exit cleanly.

    One process: our handler sets a flag, read once per step. Several: the notice may reach one
    host only, or hosts at different steps, so JAX's preemption service (started by
    jax.distributed.initialize, it catches SIGTERM on any host) agrees on a step all of them save.
    A context manager: the previous SIGTERM handler is back once training returns or raises.
    """

    def __init__(self):
        self._requested = False
        self._previous_handler = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _handle(self, signum, frame):
        del signum, frame
        self._requested = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (call exactly once per step, on every process)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested


def build_step(config, mesh: Mesh, graphdef, abstract_state):
    """The jitted train step with explicit shardings (state donated), and its shardings."""
    tx = optim.make_optimizer(config.optimizer)
    shardings = state_shardings(abstract_state, mesh, config)
    data_sharding = sharding.batch_sharding(mesh, sharding.rules_for(config.sharding_rules))
    check_micro_batches(config, data_sharding)
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, flow_cfg=flow_config(config),
        accum_steps=config.optimizer.grad_accum_steps, ema_decay=config.optimizer.ema_decay,
        learning_rate=functools.partial(optim.applied_learning_rate, config.optimizer))
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated),
                     donate_argnums=0)
    return jitted, shardings, data_sharding


def init_fn(config):
    """A function creating the step-0 train state from `config.seed`: jit it with `out_shardings`."""
    cfg, tx = model_config(config), optim.make_optimizer(config.optimizer)
    return lambda: new_state(WanDiT(cfg, rngs=nnx.Rngs(run_keys(config.seed)[0])), config, tx)


def lower_step(config, mesh: Mesh):
    """The train step traced and lowered for `mesh` from shapes alone (nothing is allocated).

    Returns (lowered step, graphdef, abstract state, state shardings, batch sharding); call inside
    `jax.set_mesh(mesh)` and the config's logical axis rules, as the trainer does.
    """
    abstract_state = jax.eval_shape(init_fn(config))
    cfg = model_config(config)
    graphdef = split_model(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))), config.trainable)[0]
    step_fn, shardings, data_sharding = build_step(config, mesh, graphdef, abstract_state)
    check_parameters_sharded(abstract_state, shardings, mesh, config)
    lowered = step_fn.lower(abstract_state, abstract_batch(config, data_sharding))
    return lowered, graphdef, abstract_state, shardings, data_sharding


def compile_step(config, mesh: Mesh):
    """`lower_step`, AOT-compiled: (compiled step, graphdef, abstract state, shardings, batch sharding)."""
    lowered, *rest = lower_step(config, mesh)
    return lowered.compile(), *rest


def abstract_batch(config, data_sharding):
    spec = batch_spec(config.data.batch_size, tuple(config.data.latent_shape), config.data.text_len,
                      config.data.text_dim)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding) for k, v in spec.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Runs (or resumes) training in `workdir` until `config.steps`; returns the final state."""
    check_config(config)
    mesh = make_mesh(config)
    cache = config.compilation_cache or storage.join(storage.absolute(workdir), "compilation_cache")
    with compilation_cache_in(cache), jax.set_mesh(mesh), \
            nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)), Preemption() as preemption:
        return _train_on_mesh(config, workdir, mesh, preemption)


@contextlib.contextmanager
def compilation_cache_in(folder: str):
    """Compiled programs are kept in `folder` (gs:// too, through etils.epath): a restart of the run
    loads its train step instead of compiling it again."""
    options = {"jax_compilation_cache_dir": folder,
               "jax_persistent_cache_min_compile_time_secs": 0.0}
    previous = {name: getattr(jax.config, name) for name in options}
    _set_compilation_cache(options)
    try:
        yield
    finally:
        _set_compilation_cache(previous)


def _set_compilation_cache(options: dict) -> None:
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # jax opens its cache folder once: make it open this one


def _train_on_mesh(config, workdir: str, mesh: Mesh, preemption: Preemption) -> TrainState:
    goodput = profiling.Goodput()
    writer = MetricWriter(workdir, write_files=jax.process_index() == 0)
    write_config(config, workdir)
    data_iterator = make_data_iterator(config, sharding.batch_sharding(mesh, sharding.rules_for(config.sharding_rules)))

    # Abstract state first; real arrays are only ever created on their shardings.
    cfg = model_config(config)
    compiled, graphdef, abstract_state, shardings, data_sharding = compile_step(config, mesh)
    _log_startup(config, abstract_state, compiled)

    manager = checkpoint.make_manager(workdir, every=config.checkpoint_every, keep_last=config.keep_last,
                                      keep_every=config.keep_every)
    abstract_on_mesh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, shardings)
    state = checkpoint.restore_latest(manager, abstract_on_mesh, data_iterator)
    if state is not None:
        print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
    else:
        if config.init_from:
            state = state_from_weights(config.init_from, config, shardings)
        else:
            state = jax.jit(init_fn(config), out_shardings=shardings)()
        checkpoint.save_frozen(manager, state.frozen)  # once per run: no step checkpoint holds them
    eval_fn = functools.partial(eval_metrics, graphdef=graphdef, flow_cfg=flow_config(config))
    eval_fns = {"": jax.jit(eval_fn)}
    if config.optimizer.ema_decay:
        eval_fns["_ema"] = jax.jit(functools.partial(eval_fn, use_ema=True))
    add = jax.jit(lambda total, new: jax.tree.map(jnp.add, total, new))
    samples = None
    if config.sample_every and config.steps // config.sample_every > int(state.step) // config.sample_every:
        # a sample step falls in this run: fixed held-out scenes, the first eval batch
        first_eval_batch = to_global(next(make_data_iterator(config, data_sharding, split="eval")), data_sharding, config)
        samples = train_samples.TrainingSamples(config, mesh, graphdef, first_eval_batch)

    train_flops = flops.train_step_flops(cfg, config.data.latent_shape, config.data.text_len,
                                         config.trainable, config.data.batch_size)
    tokens_per_example = 2 * int(np.prod(config.data.latent_shape[:3])) // int(np.prod(cfg.patch_size))
    start_step, last_log, last_time = int(state.step), int(state.step), time.perf_counter()
    breakdown = None  # the loss by task and σ bucket, summed on the device since the last log
    profiler = profiling.Profiler(workdir, config.profile_from_step, config.profile_steps, config.steps)
    skipped_corrupt = 0  # examples this process's loader dropped since it started (data.skip_corrupt)
    for step in range(start_step + 1, config.steps + 1):
        with goodput.timing("data_wait"):
            batch = next(data_iterator)
        skipped_corrupt += int(np.sum(batch.pop(loader.SKIPPED, 0)))
        batch = to_global(batch, data_sharding, config)
        profiler.before_step(step)
        with jax.transfer_guard("disallow"):
            state, metrics = compiled(state, batch)
            breakdown = metrics["breakdown"] if breakdown is None else add(breakdown, metrics["breakdown"])
        profiler.after_step(step, state)
        if step == start_step + 1:  # what a (re)start costs: compiling (or loading) the step, restoring
            jax.block_until_ready(state)
            writer.write(step, {"time_to_first_step_s": goodput.first_step(step)})
        stop = preemption.reached(step)  # read once: a SIGTERM landing after the save waits for the next step
        last = step == config.steps
        log_due = step % config.log_every == 0 or last
        eval_due = bool(config.eval_every) and step % config.eval_every == 0
        sample_due = bool(config.sample_every) and step % config.sample_every == 0
        export_due = bool(config.export_every) and step % config.export_every == 0 or last
        save_due = step % config.checkpoint_every == 0 or last or stop
        if log_due or eval_due or export_due or save_due:
            # The host waits for the device only here; between these steps it queues steps ahead.
            check_finite(state, config, manager, workdir, step)
        if log_due:
            metrics, sums = jax.device_get((metrics, breakdown))
            elapsed, last_time = time.perf_counter() - last_time, time.perf_counter()
            seconds = elapsed / (step - last_log)
            last_log, breakdown = step, None
            writer.write(step, {**_scalars(metrics, seconds, config, train_flops, tokens_per_example),
                                **flow.breakdown_means(sums), **goodput.metrics(step),
                                "skipped_corrupt": skipped_corrupt})
        if eval_due:
            with goodput.timing("eval"):
                writer.write(step, evaluate(config, eval_fns, state, data_sharding))
        if sample_due:  # logged as sample_time_s; moving the window start keeps it out of step_time_s
            with goodput.timing("sample"):
                last_time += samples.write(state, step, writer)
        if export_due:  # before the last save: a crash in between retrains the end rather than skip the export
            with goodput.timing("export"):
                export(graphdef, state, config, workdir)
        with goodput.timing("checkpoint"):
            checkpoint.save(manager, step, state, data_iterator, force=last or stop)
        if stop:
            manager.wait_until_finished()
            print(f"SIGTERM: saved step {step}, exiting", flush=True)
            sys.exit(0)
    manager.wait_until_finished()
    writer.close()
    return state


def check_finite(state: TrainState, config, manager, workdir: str, step: int) -> None:
    """Unless non-finite steps are skipped, stops at the first one, before anything after it is saved."""
    if config.optimizer.skip_nonfinite:
        return
    first = int(jax.device_get(state.first_nonfinite_step))
    if first:
        manager.wait_until_finished()
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first} (found at step {step}); stopped without saving "
            f"it: the last checkpoint (step {manager.latest_step()}) in {workdir} is intact")


def write_config(config, workdir: str) -> None:
    """The run's resolved config (overrides applied) as `config.json` in the run folder, by process 0."""
    if jax.process_index() == 0:
        with storage.atomic_open(storage.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))


def state_from_weights(path: str, config, shardings) -> TrainState:
    """A step-0 state around the weights at `path`, each array read on the host and sent to the
    devices straight as its shards (never whole onto one device); moments are created sharded."""
    model = convert.load_any(path, cfg=model_config(config), on_host=True)
    _, trainable, frozen = split_model(model, config.trainable)
    trainable, frozen = jax.device_put((trainable, hold_frozen(frozen, config)), (shardings.trainable, shardings.frozen))
    around = functools.partial(state_around, config=config, tx=optim.make_optimizer(config.optimizer))
    return jax.jit(around, out_shardings=shardings)(trainable, frozen)


def evaluate(config, eval_fns: dict, state, data_sharding) -> dict[str, float]:
    """The mean eval metrics over one pass of the fixed held-out examples, of each weights' eval function
    (its name is the metrics' suffix: "" for the raw weights, "_ema")."""
    per_batch = {suffix: [] for suffix in eval_fns}
    for batch in make_data_iterator(config, data_sharding, split="eval"):
        batch = to_global(batch, data_sharding, config)
        for suffix, eval_fn in eval_fns.items():
            per_batch[suffix].append(eval_fn(state, batch))
    return {name + suffix: value for suffix, metrics in per_batch.items()
            for name, value in evaluate_lib.mean_metrics(metrics).items()}


def export(graphdef, state: TrainState, config, workdir: str) -> str:
    """Writes the weights as a ReCamMaster .ckpt for the official PyTorch inference, with their model
    record (heads, flow shift) beside it for our sampler and converter; a non-official camera
    encoding, which that layout cannot hold, as a .safetensors with the record in its header."""
    suffix = ".ckpt" if config.model.camera_encoding == "official" else ".safetensors"
    path = storage.join(workdir, "exports", f"recammaster_step{int(state.step)}{suffix}")
    convert.save_pytorch(model_from_state(graphdef, state, use_ema=config.export_ema), path, shift=config.flow.shift)
    if jax.process_index() == 0:  # the one that wrote it
        print(f"exported {path}", flush=True)
    return path


def _scalars(metrics, seconds_per_step, config, train_flops, tokens_per_example) -> dict:
    examples_per_second = config.data.batch_size / seconds_per_step
    tflops_per_device = train_flops / seconds_per_step / jax.device_count() / 1e12
    return {
        "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
        "learning_rate": float(metrics["learning_rate"]), "step_time_s": seconds_per_step,
        "examples_per_s": examples_per_second, "tokens_per_s": examples_per_second * tokens_per_example,
        "tflops_per_device": tflops_per_device, "mfu": tflops_per_device / config.peak_tflops_per_device,
        "skipped_nonfinite": int(metrics["skipped_nonfinite"]),
    }


def _log_startup(config, abstract_state, compiled) -> None:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    print(f"devices {jax.device_count()} ({jax.devices()[0].platform}), processes {jax.process_count()}")
    print(f"parameters: {count(abstract_state.trainable):,} trainable ({config.trainable}), "
          f"{count(abstract_state.frozen):,} frozen")
    memory = compiled.memory_analysis()
    if memory is not None:
        print(f"train step memory per device: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
              f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB", flush=True)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, TensorBoard logs, exports.")


def main(argv) -> None:
    del argv
    sharding.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
