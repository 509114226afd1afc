"""The trainer: learning, trainable subsets, checkpoints, exact resume after SIGKILL, NaN handling."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from recam_jax import checkpoint, convert, optim, sharding, train
from recam_jax import compile as planner
from recam_jax.models.dit import WanDiT
from tests.conftest import REPO, read_metrics, shared_cache, tiny_config


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def read_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_overfits_one_fixed_batch():
    config = tiny_config(**{"optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
                            "optimizer.learning_rate": 1e-2, "flow.p_t2v": 0.0, "flow.p_i2v": 0.0})
    mesh = train.make_mesh(config)
    tx = optim.make_optimizer(config.optimizer)
    model = WanDiT(train.model_config(config), rngs=nnx.Rngs(0))
    graphdef = train.split_model(model, config.trainable)[0]
    state = train.new_state(model, config, tx)
    step_fn, _, data_sharding = train.build_step(config, mesh, graphdef, jax.eval_shape(lambda: state))
    batch = train.to_global(next(train.make_data_iterator(config, data_sharding)), data_sharding, config)
    losses = []
    for _ in range(55):  # the loss is below a tenth of its start by step ~42
        # Holding the step counter (which seeds noise and timesteps) at 0 fixes the whole input.
        state, metrics = step_fn(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_frozen_parameters_stay_bit_identical_and_only_trainables_have_moments(tmp_path):
    config = tiny_config(steps=5, trainable="camera+self_attn")
    final = train.train(config, str(tmp_path))
    initial = train.init_fn(config)()
    assert leaves_equal(final.frozen, initial.frozen)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final.trainable),
                                                         jax.tree.leaves(initial.trainable))]
    assert all(changed)
    trainable_paths = {p for p, _ in final.trainable.flat_state()}
    assert trainable_paths and all(any(m in p for m in ("cam_encoder", "projector", "self_attn"))
                                   for p in trainable_paths)
    adam = final.opt_state[1][0]
    assert {p for p, _ in adam.mu.flat_state()} == trainable_paths == {p for p, _ in adam.nu.flat_state()}
    exported = convert.load_pytorch(str(tmp_path / "exports" / "recammaster_step5.ckpt"),
                                    train.model_config(config))
    np.testing.assert_array_equal(exported.blocks.self_attn.q.kernel[...],
                                  final.trainable["blocks"]["self_attn"]["q"]["kernel"][...])


def test_restore_lands_on_the_mesh_and_equals_the_saved_state(tmp_path):
    # The tiny model's unshardable embedders are 4% of its weights (1e-7 % of the 1.3B's): allow it.
    config = tiny_config(steps=4, checkpoint_every=4, max_unsharded_fraction=0.05,
                         **{"mesh.data": 1, "mesh.fsdp": -1, "optimizer.ema_decay": 0.9})
    saved = train.train(config, str(tmp_path))
    mesh = train.make_mesh(config)
    assert mesh.shape["fsdp"] == jax.device_count() == 8
    abstract = jax.eval_shape(lambda: saved)
    shardings = train.state_shardings(abstract, mesh, config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    manager = checkpoint.make_manager(str(tmp_path), every=4, keep_last=1, keep_every=0)
    data_iterator = train.make_data_iterator(config, sharding.batch_sharding(mesh))
    restored = checkpoint.restore_latest(manager, target, data_iterator)
    for got, want, want_sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(shardings)):
        assert got.sharding == want_sharding
        np.testing.assert_array_equal(got, want)
    q_kernel = restored.trainable["blocks"]["self_attn"]["q"]["kernel"][...]  # (layers, embed, heads)
    assert q_kernel.sharding.spec[:2] == (None, "fsdp")
    assert len(q_kernel.addressable_shards) == 8 and q_kernel.addressable_shards[0].data.shape == (2, 8, 64)
    assert leaves_equal(restored.opt_state, saved.opt_state) and leaves_equal(restored.ema, saved.ema)
    # The data iterator resumes after the 4 batches already consumed.
    fresh = train.make_data_iterator(config, sharding.batch_sharding(mesh))
    for _ in range(4):
        next(fresh)
    assert leaves_equal(next(data_iterator), next(fresh))


def count_cache_hits(run) -> int:
    """How many programs `run()` loaded from the persistent compilation cache."""
    cache_hits = []
    listener = lambda event, **kwargs: cache_hits.append(event) if event.endswith("/cache_hits") else None
    jax.monitoring.register_event_listener(listener)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return len(cache_hits)


def test_a_restart_loads_its_compiled_programs_from_the_run_folder(tmp_path):
    config = tiny_config(steps=2, checkpoint_every=2, compilation_cache="")  # the default: the run folder
    train.train(config, str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run" / "compilation_cache")  # the first start wrote its programs there
    config.steps = 3
    assert count_cache_hits(lambda: train.train(config, str(tmp_path / "run")))  # resumes at step 2, compiles nothing
    # Each start logs how long it took to reach its first step.
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "time_to_first_step_s" in r] == [1, 3]

    # Another run given that folder as its `compilation_cache` loads the programs from there.
    config.compilation_cache = str(tmp_path / "run" / "compilation_cache")
    assert count_cache_hits(lambda: train.train(config, str(tmp_path / "other")))
    assert not os.path.exists(tmp_path / "other" / "compilation_cache")


def test_checkpoints_only_at_the_planned_steps(tmp_path):
    train.train(tiny_config(steps=5, checkpoint_every=2), str(tmp_path))
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [2, 4, 5]  # no step 1; the last always


def test_frozen_parameters_are_written_once_in_the_compute_dtype_and_restored_exactly(tmp_path):
    """Frozen weights were float32 in every step checkpoint (4.5 of the 1.3B's 8.8 GB): they are held in
    the compute dtype, written once to WORKDIR/frozen, restored bit for bit, and a config that no longer
    matches them is refused (orbax would cast them silently)."""
    config = tiny_config(steps=2, checkpoint_every=2, trainable="camera+self_attn",
                         **{"model.dtype": "bfloat16", "model.frozen_in_compute_dtype": True})
    train.train(config, str(tmp_path))
    initial = train.init_fn(config)()
    assert {x.dtype for x in jax.tree.leaves(initial.frozen)} == {jnp.dtype(jnp.bfloat16)}
    in_step_folder = convert.stored_param_shapes(str(tmp_path / "checkpoints" / "2" / "state"))
    assert any(path[0] == "trainable" for path in in_step_folder)
    assert not any(path[0] == "frozen" for path in in_step_folder)
    assert os.path.isdir(tmp_path / "frozen")
    config.steps = 3
    resumed = train.train(config, str(tmp_path))
    assert int(resumed.step) == 3 and leaves_equal(resumed.frozen, initial.frozen)
    manager = checkpoint.make_manager(str(tmp_path), every=2, keep_last=3, keep_every=0)
    held_in_float32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), initial.frozen)
    with pytest.raises(ValueError, match=r"frozen: the frozen parameters stored for this run do not match the "
                                         r"config.*: stored \(.*\) bfloat16, config \(.*\) float32"):
        checkpoint.restore_frozen(manager, held_in_float32)


def test_profile_steps_write_a_trace_and_goodput_is_logged(tmp_path):
    """There was no profiler hook, and the metrics did not say how much of the time trained."""
    config = tiny_config(steps=4, log_every=2, checkpoint_every=2, eval_every=2, profile_steps=2, profile_from_step=2)
    train.train(config, str(tmp_path))
    traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1
    planes = jax.profiler.ProfileData.from_file(traces[0]).planes
    assert any("train_step" in event.name for plane in planes for line in plane.lines for event in line.events)
    logged = [r for r in read_metrics(tmp_path) if "goodput" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert r["data_wait_s"] >= 0 and 0 < r["goodput_s"] <= r["wall_time_s"] and 0 < r["goodput"] < 1
        assert 0 < r["train_step_time_s"] < r["wall_time_s"]


def random_model(config, seed: int) -> WanDiT:
    """A tiny model whose every weight is random (camera modules included, unlike their init)."""
    graphdef, params = nnx.split(WanDiT(train.model_config(config), rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def save_weights(model, path: str) -> str:
    (convert.save_pytorch if path.endswith(".ckpt") else convert.save_orbax)(model, path)
    return path


@pytest.mark.parametrize("file_name", ["recammaster.ckpt", "params_orbax"])
def test_init_from_weights_sends_each_array_straight_to_its_shards(tmp_path, file_name):
    config = tiny_config(trainable="camera+self_attn", max_unsharded_fraction=0.05,
                         **{"mesh.data": 1, "mesh.fsdp": -1, "optimizer.ema_decay": 0.9})
    source = random_model(config, seed=7)
    path = save_weights(source, str(tmp_path / file_name))
    # Read into host memory, not onto the default device (where a 14B model does not fit) ...
    on_host = convert.load_any(path, train.model_config(config), on_host=True)
    assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(nnx.state(on_host)))
    # ... then sent to the devices as shards.
    mesh = train.make_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for(config.sharding_rules)):
        shardings = train.state_shardings(jax.eval_shape(train.init_fn(config)), mesh, config)
        state = train.state_from_weights(path, config, shardings)
    for leaf, leaf_sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == leaf_sharding
    assert leaves_equal(state, train.new_state(source, config, optim.make_optimizer(config.optimizer)))


def test_training_from_weights_starts_from_them(tmp_path):
    config = tiny_config(steps=2, trainable="camera")
    source = random_model(config, seed=3)
    config.init_from = save_weights(source, str(tmp_path / "wan.ckpt"))
    final = train.train(config, str(tmp_path / "run"))
    assert leaves_equal(final.frozen, train.split_model(source, "camera")[2])


def run_trainer(workdir, *overrides, wait=True):
    command = [sys.executable, "-m", "recam_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
               "--config.log_every=1", "--config.eval_every=0", f"--config.compilation_cache={shared_cache()}",
               *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output = process.communicate(timeout=300)[0]
        return process.returncode, output
    return process


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = "--config.steps=30"
    code, output = run_trainer(tmp_path / "straight", steps, "--config.checkpoint_every=10")
    assert code == 0, output
    process = run_trainer(tmp_path / "killed", steps, "--config.checkpoint_every=10", wait=False)
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "10"
    deadline = time.time() + 240
    while not first_checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(read_losses(tmp_path / "killed"))
    assert process.returncode == -signal.SIGKILL and killed_at < 30, "the run ended before it could be killed"
    code, output = run_trainer(tmp_path / "killed", steps, "--config.checkpoint_every=10")
    assert code == 0 and "resumed from step" in output, output

    straight, resumed = read_losses(tmp_path / "straight"), read_losses(tmp_path / "killed")
    assert resumed == {s: straight[s] for s in resumed} and max(resumed) == 30
    final = {}
    for run in ("straight", "killed"):
        final[run] = convert.load_pytorch(str(tmp_path / run / "exports" / "recammaster_step30.ckpt"),
                                          train.model_config(tiny.get_config()))
    assert leaves_equal(nnx.state(final["straight"]), nnx.state(final["killed"]))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    process = run_trainer(tmp_path, "--config.steps=100000", "--config.checkpoint_every=20", wait=False)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "20").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    saved = int(re.search(r"SIGTERM: saved step (\d+), exiting", output).group(1))
    assert saved >= 20
    manager = checkpoint.make_manager(str(tmp_path), every=20, keep_last=3, keep_every=0)
    assert manager.latest_step() == saved


def test_sigterm_arriving_just_after_a_save_is_saved_at_the_next_step(tmp_path, monkeypatch, capsys):
    """The signal lands between step 3's (skipped) save and the exit check: step 4 must be saved."""
    real_save = checkpoint.save

    def save_then_sigterm(manager, step, *args, **kwargs):
        started = real_save(manager, step, *args, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return started

    monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        train.train(tiny_config(steps=100, checkpoint_every=1000), str(tmp_path))
    assert exited.value.code == 0 and "SIGTERM: saved step 4, exiting" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler_before
    manager = checkpoint.make_manager(str(tmp_path), every=1000, keep_last=3, keep_every=0)
    assert manager.latest_step() == 4


def poison_batch(at):
    """A map over batches that fills batch number `at` (1-based) with NaN."""
    count = [0]

    def poison(batch):
        count[0] += 1
        if count[0] == at:
            batch = {**batch, "source_latents": np.full_like(batch["source_latents"], np.nan)}
        return batch

    return poison


def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train.synthetic_dataset
    monkeypatch.setattr(train, "synthetic_dataset", lambda **kw: real(**kw).map(poison_batch(7)))
    config = tiny_config(steps=10, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match=r"at step 7 .* last checkpoint \(step 5\)"):
        train.train(config, str(tmp_path))
    monkeypatch.setattr(train, "synthetic_dataset", real)
    manager = checkpoint.make_manager(str(tmp_path), every=5, keep_last=3, keep_every=0)
    assert manager.latest_step() == 5
    resumed = train.train(tiny_config(steps=6, checkpoint_every=5), str(tmp_path))
    assert int(resumed.step) == 6 and all(np.isfinite(x).all() for x in jax.tree.leaves(resumed.trainable))


def test_nan_read_late_stops_naming_the_first_bad_step_and_the_host_reads_rarely(tmp_path, monkeypatch):
    real, real_device_get = train.synthetic_dataset, jax.device_get
    poison_7, poison_8 = poison_batch(7), poison_batch(8)
    monkeypatch.setattr(train, "synthetic_dataset", lambda **kw: real(**kw).map(poison_7).map(poison_8))
    reads = []
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or real_device_get(x))
    config = tiny_config(steps=20, log_every=5, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match=r"at step 7 \(found at step 10\).* last checkpoint \(step 5\)"):
        train.train(config, str(tmp_path))
    assert len(reads) < 7  # steps 5 and 10 read: not one read per step


def test_nan_update_is_skipped_and_counted_when_configured(tmp_path, monkeypatch):
    real = train.synthetic_dataset
    monkeypatch.setattr(train, "synthetic_dataset", lambda **kw: real(**kw).map(poison_batch(3)))
    state = train.train(tiny_config(steps=5, **{"optimizer.skip_nonfinite": True}), str(tmp_path))
    assert int(state.skipped_nonfinite) == 1 and int(state.step) == 5
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_unknown_config_override_is_an_error_naming_it(tmp_path):
    code, output = run_trainer(tmp_path, "--config.optimizer.learnin_rate=1.0")
    assert code != 0 and "learnin_rate" in output


def test_grad_accumulation_equals_the_full_batch_step():
    # A moving learning rate (at 0 no parameter would move) and 4 rows per device for 4 micro-batches.
    config = tiny_config(**{"optimizer.warmup_steps": 0, "optimizer.schedule": "constant", "data.batch_size": 32})
    tx = optim.make_optimizer(config.optimizer)
    model = WanDiT(train.model_config(config), rngs=nnx.Rngs(0))
    graphdef = train.split_model(model, config.trainable)[0]
    state = train.new_state(model, config, tx)
    mesh = train.make_mesh(config)
    batch = next(train.make_data_iterator(config, sharding.batch_sharding(mesh)))
    results = []
    for accum in (1, 4):
        config.optimizer.grad_accum_steps = accum
        step_fn, _, data_sharding = train.build_step(config, mesh, graphdef, jax.eval_shape(lambda: state))
        results.append(step_fn(jax.tree.map(jnp.copy, state), train.to_global(batch, data_sharding, config)))
    (full_state, full), (accum_state, accum) = results
    np.testing.assert_allclose(accum["loss"], full["loss"], rtol=1e-5)
    np.testing.assert_allclose(accum["grad_norm"], full["grad_norm"], rtol=1e-5)
    assert not leaves_equal(full_state.trainable, state.trainable)
    # Adam's first update is lr·g/(|g| + eps): near-zero gradients turn float noise into up to ~0.2% of lr.
    for a, b in zip(jax.tree.leaves(accum_state.trainable), jax.tree.leaves(full_state.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-3 * config.optimizer.learning_rate)


def test_fewer_rows_per_device_than_micro_batches_is_refused_naming_the_field():
    """8 rows on 8 devices in 2 micro-batches would all-gather the batch inside the step."""
    config = tiny_config(**{"optimizer.grad_accum_steps": 2})
    with pytest.raises(ValueError, match=r"optimizer.grad_accum_steps=2 does not divide the 1 rows each device"):
        planner.plan(config)
    config.data.batch_size = 16  # 2 rows per device: each device splits its own rows
    assert planner.plan(config).collectives["all-gather"] == 0


@pytest.mark.parametrize("field, value", [
    ("flow.loss_weighting", "uniform"), ("flow.timestep_sampling", "logitnormal"), ("trainable", "camera+attn"),
    ("model.remat", "dots"), ("model.attention", "flash"), ("model.variant", "1.3b"), ("model.dtype", "bf16"),
    ("data.source", "tfrecords"), ("sharding_rules", "fsdp"), ("optimizer.schedule", "linear"),
    ("model.timestep_dtype", "bf16"), ("sample.vae", "wan21"),
])
def test_a_misspelt_choice_is_refused_naming_the_field_and_the_choices(field, value):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r} is not one of '")):
        train.check_config(config)


def test_no_step_key_is_a_parameter_init_key(monkeypatch):
    # Unrolled blocks, so every init key is drawn concretely (nnx.vmap draws stacked blocks' keys traced);
    # the keys come from the same stream either way.
    config = tiny_config(**{"model.scan_layers": False})
    drawn = []
    real_fold_in = jax.random.fold_in

    def recording_fold_in(key, data):  # nnx.Rngs draws each init key as fold_in(stream key, count)
        folded = real_fold_in(key, data)
        drawn.append(np.asarray(jax.random.key_data(folded)).tobytes())
        return folded

    monkeypatch.setattr(jax.random, "fold_in", recording_fold_in)
    state = train.init_fn(config)()  # eagerly, so every drawn key is concrete
    monkeypatch.undo()
    assert len(drawn) > 10
    step_keys = {np.asarray(jax.random.key_data(train.step_key(state.replace(step=jnp.int32(s))))).tobytes()
                 for s in range(1000)}
    assert not step_keys & set(drawn)


def learning_rates(workdir):
    return {r["step"]: r["learning_rate"] for r in read_metrics(workdir) if "learning_rate" in r}


def test_logged_learning_rate_is_the_one_optax_applied(tmp_path, monkeypatch):
    """Warmup 20 to 3e-3: the first update moves; a skipped step does not advance the schedule."""
    real = train.synthetic_dataset
    monkeypatch.setattr(train, "synthetic_dataset", lambda **kw: real(**kw).map(poison_batch(3)))
    train.train(tiny_config(steps=5, **{"optimizer.skip_nonfinite": True}), str(tmp_path))
    peak, warmup = 3e-3, 20
    expected = {1: peak * 1 / warmup, 2: peak * 2 / warmup, 3: peak * 3 / warmup, 4: peak * 3 / warmup,
                5: peak * 4 / warmup}
    assert learning_rates(tmp_path) == pytest.approx(expected, rel=1e-6)


def test_final_step_is_checkpointed_and_exported_once(tmp_path, capsys):
    config = tiny_config(steps=4, checkpoint_every=3, export_every=2)
    train.train(config, str(tmp_path))
    exported = re.findall(r"exported .*step(\d+)\.ckpt", capsys.readouterr().out)
    assert exported == ["2", "4"]
    assert checkpoint.make_manager(str(tmp_path), every=3, keep_last=3, keep_every=0).latest_step() == 4
    # A rerun of the finished run neither trains nor exports again.
    state = train.train(config, str(tmp_path))
    output = capsys.readouterr().out
    assert int(state.step) == 4 and "resumed from step 4" in output and "exported" not in output


def test_run_folder_has_the_resolved_config_and_metrics_by_task_timestep_and_ema(tmp_path):
    config = tiny_config(steps=2, log_every=2, eval_every=2, **{"optimizer.ema_decay": 0.5, "flow.p_t2v": 0.3,
                                                                "flow.p_i2v": 0.3})
    train.train(config, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["steps"] == 2 and written["optimizer"]["ema_decay"] == 0.5 and written["flow"]["p_t2v"] == 0.3
    records = read_metrics(tmp_path)
    logged, evaluated = (next(r for r in records if key in r) for key in ("loss", "eval_loss"))
    assert {"loss_v2v", "loss_i2v", "loss_t2v"} <= set(logged)  # 16 examples: each task drawn
    assert any(name.startswith("loss_sigma_") for name in logged)
    assert {"eval_loss", "eval_loss_ema", "camera_gap", "camera_gap_ema"} <= set(evaluated)
    assert evaluated["eval_loss"] != evaluated["eval_loss_ema"]
