"""Training and evaluation end to end on a tiny demo dataset: loop, checkpoints, resume, devices, results."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax import eval_workdir, evaluate, hosts, methods, models, train, train_state, train_step
from tam_jax.config_checks import validate
from tests.helpers import REPO, flags_for, load_config, read_params, tiny_config


@pytest.mark.e2e  # a whole run: training with validation, then evaluation of every scorer at two shots
def test_train_and_evaluate_writes_checkpoints_logs_and_results(tmp_path, monkeypatch):
    config = tiny_config()
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 2
    config.eval.shots = "1,2"
    monkeypatch.chdir(tmp_path.parent)  # a relative workdir, as users type it
    train.train(config, tmp_path.name)
    records = eval_workdir.evaluate_workdir(config, tmp_path.name)

    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and 3 in steps  # latest kept, and step 3 holds a validation accuracy
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    schedule = train_state.learning_rate_schedule(config)  # logged from the host, at each step's start
    assert [r["learning_rate"] for r in log if "loss" in r] == pytest.approx([schedule(s) for s in range(6)])
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    # Validation logs the evaluator's named metrics: the run's scorer at its shot selects the best.
    validations = {r["step"]: r["val_accuracy/tam/1shot"] for r in log if "val_accuracy/tam/1shot" in r}
    assert sorted(validations) == [3, 6]
    assert all(r["val_ci95/tam/1shot"] >= 0 for r in log if "val_accuracy/tam/1shot" in r)
    from tam_jax.checkpoints import CheckpointManager

    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    best = manager.best_step()
    manager.close()
    assert validations[best] == max(validations.values())
    assert list((tmp_path / "tensorboard").iterdir())

    written = json.loads((tmp_path / "results.json").read_text())
    assert written == sorted(written, key=lambda r: (r["split"], r["scorer"], r["way"], r["shot"]))
    assert {(r["scorer"], r["shot"]) for r in written} == {
        (s, k) for s in ("tam", "plain_dtw", "diagonal", "mean", "min", "tsn") for k in (1, 2)
    }
    for record in records:
        assert record["split"] == "test" and record["way"] == 5 and record["episodes"] == 40
        assert 0 <= record["accuracy"] <= 1 and record["ci95"] > 0


@pytest.mark.e2e
def test_resume_after_sigterm_ends_where_an_uninterrupted_run_does(tmp_path):
    config = tiny_config(num_steps=8)
    config.train.val_every_steps = 0
    config.train.checkpoint_every_steps = 100  # only the SIGTERM save and the final one
    config.train.log_every_steps = 1
    command = [sys.executable, "-m", "tam_jax.main", "--config=configs/demo.py", *flags_for(config)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    straight = tmp_path / "straight"
    subprocess.run([*command, f"--workdir={straight}"], cwd=REPO, env=env, check=True, timeout=300,
                   capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([*command, f"--workdir={interrupted}"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = interrupted / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "training never logged its first steps"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 143, output  # saved, stopped, and said so by its exit status
    assert output.count("SIGTERM received") == 1 and "resume" in output, output  # said once
    assert not (interrupted / "results.json").exists()  # an unfinished model is not evaluated
    stopped_at, _ = read_params(str(interrupted), config)
    assert 2 <= stopped_at < 8

    subprocess.run([*command, f"--workdir={interrupted}"], cwd=REPO, env=env, check=True, timeout=300,
                   capture_output=True)
    step_a, state_a = read_params(str(straight), config)
    step_b, state_b = read_params(str(interrupted), config)
    assert step_a == step_b == 8
    jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
    jax.tree.map(np.testing.assert_array_equal, state_a.opt_state, state_b.opt_state)
    results = lambda workdir: json.loads((workdir / "results.json").read_text())
    assert results(interrupted) == results(straight)


def one_step(config, batch, with_state=False):
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    step = train_step.make_train_step(config, model, optimizer, mesh)
    state, metrics = step(state, train_step.shard_batch(batch, mesh))
    if with_state:
        return jax.device_get(state), jax.device_get(metrics)
    return jax.device_get(state.params), jax.device_get(metrics)


def synthetic_batch(config, episodes):
    rng = np.random.default_rng(0)
    way, shot, queries = config.fewshot.way, config.fewshot.shot, config.fewshot.queries
    clip = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
    return {
        "support": rng.integers(0, 256, (episodes, way * shot, *clip), dtype=np.uint8),
        "query": rng.integers(0, 256, (episodes, way * queries, *clip), dtype=np.uint8),
        "query_labels": np.tile(np.repeat(np.arange(way), queries), (episodes, 1)).astype(np.int32),
    }


def assert_eight_devices_give_the_one_device_step(config):
    """One step of 8 episodes on 1 device and on 8: the same loss and parameters."""
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    batch = synthetic_batch(config, episodes=8)
    # One micro-batch of all 8 episodes either way: BatchNorm sees the same frames.
    config.mesh.num_devices, config.train.episodes_per_device_step = 1, 8
    params_1, metrics_1 = one_step(config, batch)
    config.mesh.num_devices, config.train.episodes_per_device_step = 8, 1
    params_8, metrics_8 = one_step(config, batch)
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_8)


def test_eight_devices_give_the_same_step_as_one():
    config = tiny_config()
    # Plain SGD: Adam's first step is sign-like and would magnify reduction-order noise in tiny gradients.
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.01
    assert_eight_devices_give_the_one_device_step(config)


def _sgd_config(episodes):
    config = tiny_config()
    config.train.optimizer, config.train.learning_rate = "sgd", 0.01
    config.train.episodes_per_step = episodes
    return config


def _assert_trees_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_accumulation_makes_the_update_of_one_large_batch_with_frozen_batchnorm():
    config = _sgd_config(episodes=4)
    config.model.freeze_bn = True  # the backbone's forward no longer depends on which episodes share it
    config.mesh.num_devices = 1
    batch = synthetic_batch(config, episodes=4)
    config.train.episodes_per_device_step = 4
    params_whole, metrics_whole = one_step(config, batch)
    config.train.episodes_per_device_step = 1  # 4 micro-batches of 1 episode
    params_micro, metrics_micro = one_step(config, batch)
    np.testing.assert_allclose(metrics_micro["loss"], metrics_whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_micro["accuracy"], metrics_whole["accuracy"], rtol=1e-6)
    _assert_trees_close(params_micro, params_whole)


def test_batchnorm_sees_each_micro_batch_in_turn_whatever_the_device_count():
    config = _sgd_config(episodes=8)
    batch = synthetic_batch(config, episodes=8)
    # Micro-batches of 4 episodes (i, i+2, i+4, i+6), on 1 device or split over 2: the same step.
    config.mesh.num_devices, config.train.episodes_per_device_step = 1, 4
    state_1, _ = one_step(config, batch, with_state=True)
    config.mesh.num_devices, config.train.episodes_per_device_step = 2, 2
    state_2, _ = one_step(config, batch, with_state=True)
    _assert_trees_close(state_2.params, state_1.params)
    _assert_trees_close(state_2.batch_stats, state_1.batch_stats)

    # The running statistics are those of the two micro-batches' forward passes, one after the other.
    mesh = hosts.make_mesh(1)
    model = models.build_embedder(config.model)
    initial = train_state.create_train_state(config, model, train_state.make_optimizer(config), mesh)
    stats = initial.batch_stats
    embed = jax.jit(lambda s, b: train_step.embed_episode(initial.params, s, b, model=model))
    for i in range(2):
        _, stats = embed(stats, {k: v[i::2] for k, v in batch.items()})
    _assert_trees_close(jax.device_get(stats), state_1.batch_stats)
    # ... and not those of one forward pass over all 8 episodes.
    _, whole = embed(initial.batch_stats, batch)
    assert not np.allclose(jax.tree.leaves(jax.device_get(whole))[0], jax.tree.leaves(state_1.batch_stats)[0])


def test_micro_batches_take_strided_episodes():
    batch = {"x": np.arange(12).reshape(6, 2), "y": np.arange(6)}
    micro = train_step.split_micro_batches(batch, 3)
    np.testing.assert_array_equal(micro["y"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(micro["x"][1], batch["x"][[1, 4]])


def test_bfloat16_step_keeps_parameters_statistics_and_loss_in_float32():
    config = _sgd_config(episodes=2)
    config.model.dtype = "bfloat16"
    config.mesh.num_devices, config.train.episodes_per_device_step = 1, 1
    state, metrics = one_step(config, synthetic_batch(config, episodes=2), with_state=True)
    for tree in (state.params, state.batch_stats, metrics):
        assert {np.asarray(x).dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
    # ... while the backbone's convolutions run in bfloat16.
    model = models.build_embedder(config.model)
    frames = jax.ShapeDtypeStruct((1, 1, 24, 24, 3), np.uint8)
    variables = jax.eval_shape(lambda f: model.init(jax.random.key(0), f, train=False), frames)
    forward = lambda v, f: model.apply(v, f, train=True, mutable=["batch_stats"])  # noqa: E731
    jaxpr = jax.make_jaxpr(forward)(variables, frames)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    config, finished = trained  # the session's tiny run on one device, finished at its last step
    shutil.copytree(finished, tmp_path / "good")
    last_good = config.train.num_steps
    original = train_step.fewshot.cross_entropy
    calls = []

    def poisoned(logits, labels):
        # Traced once per compilation: a NaN loss from the first step on.
        calls.append(1)
        return original(logits, labels) * np.nan

    monkeypatch.setattr(train_step.fewshot, "cross_entropy", poisoned)
    config.train.num_steps = last_good + 2
    with pytest.raises(train.StopTraining, match="Non-finite"):
        train.train(config, str(tmp_path / "good"))
    assert calls
    step, _ = read_params(str(tmp_path / "good"), config)
    assert step == last_good


def test_config_errors_name_the_key_before_any_compute(tmp_path):
    config = load_config("folder")
    with pytest.raises(ValueError, match="config.data.root"):
        validate(config)
    config = tiny_config()
    config.fewshot.way = 11  # the demo's test split has 10 classes
    with pytest.raises(ValueError, match="10"):
        eval_workdir.evaluate_workdir(config, str(tmp_path))
    config = tiny_config()
    config.fewshot.scorer = "otam"
    with pytest.raises(ValueError, match="config.fewshot.scorer"):
        validate(config)


@pytest.mark.e2e
def test_an_unknown_config_key_on_the_command_line_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tam_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--config.train.no_such_key=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "no_such_key" in result.stderr


def test_cached_embeddings_give_the_same_accuracy_as_embedding_each_episode(tmp_path):
    from tam_jax.data import pipeline
    from tam_jax.data.clips import load_clip
    from tam_jax.data.episodes import EpisodeSampler
    from tam_jax.data.report import SkipReport
    from tam_jax.embedding import Embedder, embed_share

    config = tiny_config()
    config.mesh.num_devices = 1
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    state = train_state.create_train_state(config, model, train_state.make_optimizer(config), mesh)
    split = pipeline.prepare_split(config, "test", SkipReport())
    clips = pipeline.load_clip_share(config, split, SkipReport())
    embedder = Embedder(model, train_state.embedder_variables(state), mesh, config.eval.embed_batch_size)
    embeddings, labels = embed_share(embedder, clips), clips.labels
    scorers = tuple(methods.build(name, config) for name in ("tam", "mean", "tsn"))
    kwargs = dict(way=5, shot=1, queries=2, seed=3, scorers=scorers)
    cached = evaluate.evaluate_embeddings(embeddings, labels, num_episodes=6, episodes_per_batch=4,
                                          show_progress=False, **kwargs)

    sampler = EpisodeSampler(labels, way=5, shot=1, queries=2, seed=3)
    variables = train_state.embedder_variables(state)
    spec = pipeline.clip_spec(config)
    embed = jax.jit(lambda variables, clips: model.apply(variables, clips, train=False))
    for index in range(6):
        episode = sampler.episode(index)
        rows = np.concatenate([episode.support.reshape(-1), episode.query])
        clips = np.stack([load_clip(split.source, int(split.items[r]), spec) for r in rows])
        features = embed(variables, clips)
        accuracy = evaluate.frame_episode_accuracies(
            scorers, None, features[None, :5], features[None, 5:], episode.query_labels[None], way=5, shot=1)
        for i, name in enumerate(("tam", "mean", "tsn")):
            assert cached[name][index] == pytest.approx(float(accuracy[i, 0]), abs=1e-6)
