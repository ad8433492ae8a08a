"""The execution plan (tam_jax.plan): devices, micro-batches, chunks and remat chosen from the machine."""

import json
import os
import subprocess
import sys

import jax
import pytest

from tam_jax import plan, train
from tam_jax.configuration import PLAN_AUTO
from tests.helpers import REPO, load_config, tiny_config

GIB = plan.GIB


def auto(config):
    """`config` with every plan key left to the plan, as the shipped configs leave them."""
    return plan.with_overrides(config, PLAN_AUTO)


@pytest.mark.parametrize(("visible", "expected"), [(1, 1), (2, 2), (3, 2), (4, 4), (8, 4)])
def test_a_steps_episodes_split_evenly_over_as_many_devices_as_divide_them(visible, expected):
    config = load_config()  # 4 episodes per step
    devices, note = plan.choose_num_devices(config, visible)
    assert devices == expected
    assert (f"over {expected} of the {visible} devices" in note) == (expected < visible)


def test_device_counts_that_cannot_work_name_the_values_that_do():
    config = load_config()
    config.mesh.num_devices = 3
    with pytest.raises(plan.PlanError, match=r"mesh\.num_devices=3 does not divide.*set mesh\.num_devices to "
                                             r"1, 2 or 4 \(or 0 to choose\)"):
        plan.choose_num_devices(config, 8)
    config.mesh.num_devices = 16
    with pytest.raises(plan.PlanError, match=r"num_devices=16 but 8 devices are visible; set it to 1, 2 or "
                                             r"4"):
        plan.choose_num_devices(config, 8)
    config.mesh.num_devices = 0  # several processes: every device takes part
    with pytest.raises(plan.PlanError, match=r"episodes_per_step=4 does not split over the 6 devices of 2 "
                                             r"processes.*multiple of 6 \(e\.g\. .*episodes_per_step=6\)"):
        plan.choose_num_devices(config, 6, processes=2)
    assert plan.choose_num_devices(config, 4, processes=2) == (4, "")


def test_candidates_go_from_fastest_to_smallest_and_keep_what_the_config_sets():
    config = load_config()  # 5-way 1-shot, 3 queries: 20 videos an episode
    setting = lambda e, c, r: {"train.episodes_per_device_step": e, "train.embed_chunks": c, "model.remat": r}
    assert plan.candidates(config, 1) == [
        setting(4, 1, "none"), setting(2, 1, "none"), setting(1, 1, "none"),  # more micro-batches
        setting(1, 2, "none"), setting(1, 4, "none"),  # chunks of at most 10, then 5 videos
        setting(1, 1, "block"), setting(1, 2, "block"), setting(1, 4, "block"),  # remat, then both
    ]
    assert plan.candidates(config, 2)[0] == setting(2, 1, "none")  # a device's share: 2 episodes
    config.model.remat = "block"
    assert {c["model.remat"] for c in plan.candidates(config, 1)} == {"block"}
    config.train.episodes_per_device_step = 3
    with pytest.raises(plan.PlanError, match=r"episodes_per_device_step=3 does not divide the 4 episodes.*"
                                             r"set it to 1, 2 or 4, or 0"):
        plan.candidates(config, 1)
    config.train.episodes_per_device_step, config.train.embed_chunks = 0, 3
    with pytest.raises(plan.PlanError, match=r"embed_chunks=3 does not divide the 20 videos.*1, 2, 4, 5, "
                                             r"10 or 20"):
        plan.candidates(config, 1)


def fake_measure(calls):
    """A stand-in compiler: GiB = episodes at once x videos per chunk / 20 x (0.3 with block remat)."""

    def measure(config, mesh, unroll):
        calls.append(config)
        videos = 20 / config.train.embed_chunks
        remat = 0.3 if config.model.remat == "block" else 1
        total = config.train.episodes_per_device_step * videos / 20 * remat
        return f"compiled {config.train.episodes_per_device_step}", plan.StepMemory(int(total * GIB), 0, 0, 0)

    return measure


@pytest.mark.parametrize(("limit_gib", "expected", "compiles"), [
    (5.0, (4, 1, "none"), 1),  # all four episodes at once: 4 GiB
    (2.5, (2, 1, "none"), 2),  # two micro-batches of two
    (0.9, (1, 2, "none"), 4),  # one episode at a time is 1 GiB: then chunks of 10 videos
    (0.3, (1, 4, "none"), 5),  # chunks of 5 videos: 0.25 GiB
    (0.2, (1, 2, "block"), 7),  # remat alone (0.3 GiB) does not fit either: remat and chunks
    (0.1, (1, 4, "block"), 8),
])
def test_a_shrinking_limit_chooses_micro_batches_then_chunks_then_remat(limit_gib, expected, compiles):
    config = load_config()
    config.mesh.num_devices = 1
    calls = []
    chosen, mesh, compiled = plan.make_plan(config, limit=int(limit_gib * GIB), measure=fake_measure(calls))
    assert (chosen.episodes_per_device_step, chosen.embed_chunks, chosen.remat) == expected
    assert len(calls) == compiles  # compiled in order, stopping at the first that fits
    assert compiled == f"compiled {expected[0]}"  # the run trains with the executable the plan compiled
    assert chosen.micro_batches == 4 // expected[0] and chosen.step_bytes <= plan.MARGIN * chosen.limit_bytes
    assert mesh.size == 1


def test_when_nothing_fits_the_error_lists_every_setting_tried_with_its_memory():
    config = load_config()
    config.mesh.num_devices = 1
    with pytest.raises(plan.PlanError) as error:
        plan.make_plan(config, limit=int(0.05 * GIB), measure=fake_measure([]))
    message = str(error.value)
    assert message.startswith("no plan fits in 0.05 GiB per device")
    rows = [line for line in message.splitlines() if line.startswith("  --config.")]
    assert len(rows) == 8
    assert rows[0].endswith("4.00 GiB") and rows[-1].endswith("0.07 GiB")
    assert "--config.train.embed_chunks=4 --config.model.remat=block" in rows[-1]


def test_without_a_known_limit_the_fastest_plan_is_taken_uncompiled():
    config = load_config()
    config.mesh.num_devices = 1
    assert plan.memory_limit(config) is None  # the CPU backend reports none
    chosen, _, compiled = plan.make_plan(config, measure=lambda *a: pytest.fail("compiled"))
    assert compiled is None and chosen.step_bytes is None
    assert (chosen.episodes_per_device_step, chosen.embed_chunks, chosen.remat) == (4, 1, "none")
    assert chosen.unroll_loops  # XLA:CPU without a budget
    config.train.memory_limit_gib = 8.0  # a budget: planned, loops kept as a GPU keeps them
    assert plan.memory_limit(config) == 8 * GIB
    calls = []
    chosen, _, _ = plan.make_plan(config, measure=fake_measure(calls))
    assert len(calls) == 1 and not chosen.unroll_loops and chosen.limit_bytes == 8 * GIB


def test_step_memory_of_micro_batches_depends_on_their_size():
    config = tiny_config()
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 4
    mesh = plan.hosts.make_mesh(1)
    config.train.episodes_per_device_step = 4
    _, whole = plan.compile_step(config, mesh)
    config.train.episodes_per_device_step = 1
    _, micro = plan.compile_step(config, mesh)
    assert whole.argument == micro.argument > 0
    assert micro.total == micro.argument + micro.output + micro.temp - micro.alias
    assert micro.temp < 0.5 * whole.temp


def test_the_plan_measures_the_step_of_the_runs_own_method():
    """TRX's step holds its tuple keys, values and attention: the compiled step the plan measures is TRX's,
    parameters (in the arguments) and activations (temp) included."""
    config = tiny_config()
    config.mesh.num_devices = 1
    config.train.episodes_per_step = config.train.episodes_per_device_step = 2
    mesh = plan.hosts.make_mesh(1)
    _, tam = plan.compile_step(config, mesh)
    config.fewshot.scorer = "trx"
    config.methods = {"trx": {"dim": 256}}
    _, trx = plan.compile_step(config, mesh)
    assert trx.argument > tam.argument and trx.temp > tam.temp


def _fake_checkpoint(workdir, stored: plan.Plan):
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))
    plan.store_plan(str(workdir), stored)


def test_a_resumed_run_takes_its_stored_plan_and_says_what_to_do_when_it_cannot(tmp_path):
    config = auto(tiny_config())  # 8 episodes per step: every one of the 8 devices on its own
    assert plan.make_plan(config, workdir=str(tmp_path))[0].num_devices == 8
    stored = plan.Plan(num_devices=2, episodes_per_device_step=2, embed_chunks=3, remat="none",
                       micro_batches=2, unroll_loops=False)
    plan.store_plan(str(tmp_path), stored)  # no checkpoint yet: a new run plans anew
    assert plan.make_plan(config, workdir=str(tmp_path))[0].num_devices == 8
    _fake_checkpoint(tmp_path, stored)
    assert plan.make_plan(config, workdir=str(tmp_path))[0] == stored
    config.train.embed_chunks = 5  # a value the command sets wins over the stored one
    assert plan.make_plan(config, workdir=str(tmp_path))[0].embed_chunks == 5

    elsewhere = tmp_path / "sixteen"
    _fake_checkpoint(elsewhere, plan.Plan(16, 1, 1, "none", 1, False))
    with pytest.raises(plan.PlanError, match=r"started with \(.*sixteen/plan\.json\) cannot run here: config"
                                             r"\.mesh\.num_devices=16 but 8 devices are visible.*delete"):
        plan.make_plan(auto(tiny_config()), workdir=str(elsewhere))
    (elsewhere / "plan.json").write_text("{not json")
    with pytest.raises(plan.PlanError, match=r"plan\.json cannot be read .*delete it to plan anew"):
        plan.make_plan(auto(tiny_config()), workdir=str(elsewhere))


def test_plan_mode_prints_a_pasteable_plan_for_every_shipped_config(tmp_path):
    names = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "common")  # not a config
    assert {"demo", "kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51", "folder"} <= set(names)
    for name in names:
        for arg in ([None, "shot=5"] if name != "demo" and name != "folder" else [None]):
            config = load_config(name, arg)
            assert all(plan.is_auto(config, key) for key in PLAN_AUTO), f"configs/{name}.py sets a plan key"
            text = plan.plan_command(config, str(tmp_path / name))
            last = text.splitlines()[-1]
            assert last.startswith("plan: --config.mesh.num_devices=4 ")
            # Pasted back, the overrides give the same plan.
            pasted = last.removeprefix("plan: ").split(";")[0].split()
            overrides = dict(item.removeprefix("--config.").split("=") for item in pasted)
            typed = {key: type(PLAN_AUTO[key])(value) for key, value in overrides.items()}
            again = plan.plan_command(plan.with_overrides(config, typed), str(tmp_path))
            assert again.splitlines()[-1] == last
    assert not any(tmp_path.iterdir())  # nothing written


def run_main(args, devices, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "tam_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_plan_mode_on_the_command_line_and_a_plan_that_cannot_run_in_one_line(tmp_path):
    result = run_main(["--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=plan"], devices=3)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("plan: --config.mesh.num_devices=2 "
                                "--config.train.episodes_per_device_step=2 ")
    assert "over 2 of the 3 devices" in result.stdout + result.stderr
    result = run_main(["--config=configs/demo.py", f"--workdir={tmp_path}", "--config.mesh.num_devices=3"],
                      devices=3)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: config.mesh.num_devices=3 does not divide config.train.episodes_per_step=4")
    assert not os.path.exists(tmp_path / "checkpoints")


# The demo on a few videos, a few steps and few test episodes; nothing about how it runs is set.
SMALL_DEMO = ["--config=configs/demo.py", "--config.data.demo.videos_per_class=6", "--config.data.resize=28",
              "--config.data.image_size=24", "--config.data.num_frames=4", "--config.train.num_steps=2",
              "--config.train.val_every_steps=0", "--config.eval.num_episodes=20",
              "--config.eval.episodes_per_batch=20"]


@pytest.mark.e2e
@pytest.mark.parametrize(("devices", "used"), [(1, 1), (2, 2), (3, 2), (4, 4), (8, 4)])
def test_the_demo_runs_unchanged_on_any_device_count(tmp_path, devices, used):
    result = run_main([*SMALL_DEMO, f"--workdir={tmp_path}"], devices)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["num_devices"] == used and stored["episodes_per_device_step"] == 4 // used
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["num_devices"] == used
    assert (tmp_path / "results.json").exists()


@pytest.mark.e2e  # a whole (2-step) training run
def test_a_memory_budget_compiles_once_and_trains_with_that_executable(tmp_path, monkeypatch):
    config = tiny_config(num_steps=2)
    config.mesh.num_devices = 1
    config.train.episodes_per_device_step = 0  # the plan's
    config.train.memory_limit_gib = 4.0
    config.train.val_every_steps = 0
    compiles = []
    real_compile = plan.compile_step
    monkeypatch.setattr(plan, "compile_step", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("compiled a second step"))
    state = train.train(config, str(tmp_path))
    assert int(state.step) == 2 and len(compiles) == 1
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["episodes_per_device_step"] == 8 and 0 < stored["step_bytes"] <= 0.95 * 4 * GIB


class RecordingBar:
    """A progress bar that checks, at every update, that the step it counts has finished computing."""

    def __init__(self, outputs, initial):
        self.outputs, self.count, self.initial = outputs, initial, initial

    def update(self, n=1):
        self.count += n
        finished = self.outputs[self.count - self.initial - 1]
        assert all(x.is_ready() for x in jax.tree.leaves(finished)), f"step {self.count} counted unfinished"

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


@pytest.mark.e2e  # a whole (6-step) training run
def test_the_progress_bar_counts_finished_steps(tmp_path, monkeypatch):
    config = tiny_config(num_steps=6)
    config.train.val_every_steps = 0
    outputs, bars = [], []
    real_step = train.make_train_step

    def recording_step(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def run(state, batch):
            state, metrics = step(state, batch)
            outputs.append(metrics)
            unfinished = sum(not x.is_ready() for m in outputs for x in jax.tree.leaves(m))
            assert unfinished <= 2 * len(metrics), "dispatch ran more than one step ahead"
            return state, metrics

        return run

    monkeypatch.setattr(train, "make_train_step", recording_step)
    real_bar = train.progress.bar

    def bar(total, desc, unit, *, initial=0, **kwargs):
        if desc != "training":
            return real_bar(total, desc, unit, initial=initial, **kwargs)
        bars.append(RecordingBar(outputs, initial))
        return bars[-1]

    monkeypatch.setattr(train.progress, "bar", bar)
    train.train(config, str(tmp_path))
    assert len(bars) == 1 and bars[0].count == 6 == len(outputs)
