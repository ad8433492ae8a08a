"""A user's own data and weights end to end, on real files (`tests/realdata.py`): `python -m tam_jax.main`
on split folders of JPEG frames and of H.264 MP4s, an imported backbone evaluated on SSv2-style OTAM lists
over split folders, `tam_jax.predict` on the result, and the TFDS builders on the same folders."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tam_jax import eval_workdir, methods, predict
from tam_jax.tools import import_weights as iw
from tests import realdata
from tests.helpers import REPO, load_config

# Whole data layouts on disk, trained and evaluated by `python -m tam_jax.main` processes.
pytestmark = pytest.mark.e2e

# A few steps of `tiny` on 2-frame, 28-pixel clips, 2-way 1-shot with one query: seconds, not minutes.
TINY = [
    "--config.model.arch=tiny", "--config.fewshot.way=2", "--config.fewshot.queries=1",
    "--config.data.num_frames=2", "--config.data.resize=32", "--config.data.image_size=28",
    "--config.train.episodes_per_step=1", "--config.train.log_every_steps=1",
    "--config.train.val_episodes=4", "--config.eval.num_episodes=4", "--config.eval.episodes_per_batch=4",
    "--config.eval.embed_batch_size=4", "--config.mesh.num_devices=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("bring_your_data")
    realdata.split_folders_of_frames(base / "frames")
    realdata.split_folders_of_mp4s(base / "videos")
    realdata.otam_lists_over_split_folders(base / "ssv2", base / "lists")
    return base


def run_main(*flags):
    """`python -m tam_jax.main FLAGS` as a user runs it; returns the finished process (text output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
    done = subprocess.run([sys.executable, "-m", "tam_jax.main", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def library_warnings(stderr: str) -> list[str]:
    """absl WARNING lines (W1203 ...) and Python warnings (...Warning: ...) of a run's stderr."""
    return [line for line in stderr.splitlines() if re.match(r"^W\d{4} ", line) or "Warning:" in line]


@pytest.fixture(scope="module")
def frames_run(data):
    """Split folders of frames, nothing but --config.data.root: train, validate and evaluate."""
    workdir = data / "run_frames"
    done = run_main("--config=configs/folder.py", f"--workdir={workdir}",
                    f"--config.data.root={data / 'frames'}", "--config.model.init_from=",
                    "--config.train.num_steps=2", "--config.train.val_every_steps=2", *TINY)
    return workdir, done


def test_split_folders_of_frames_train_and_evaluate_with_only_a_root(data, frames_run):
    workdir, done = frames_run
    for split in ("train", "val", "test"):
        assert f"Reading split folders: {data / 'frames' / split}, " in done.stderr
    assert "prefetch_buffer_size" not in done.stderr
    assert library_warnings(done.stderr) == []
    results = json.loads((workdir / "results.json").read_text())
    assert {r["scorer"] for r in results} == set(methods.names(learned=False))
    assert all(r["checkpoint_step"] == 2 and r["episodes"] == 4 for r in results)


def test_predict_classifies_frame_folders_with_flow_and_an_mp4(data, frames_run, tmp_path, capsys):
    workdir, _ = frames_run
    queries = [str(data / "frames" / "test" / "golf" / "v1"),  # img_ + flow_x_/flow_y_ frames
               str(data / "videos" / "test" / "hurdling" / "v1.mp4")]  # H.264, B-frames, 29.97 fps
    out = tmp_path / "predictions.json"
    assert predict.main(["--checkpoint", str(workdir), "--support", str(data / "frames" / "test"),
                         "--query", *queries, "--json", str(out), "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    assert payload["errors"] == []  # hidden clutter in the support folder is no clip
    assert [p["query"] for p in payload["predictions"]] == queries
    for prediction in payload["predictions"]:
        assert {r["class"] for r in prediction["ranking"]} == {"golf", "hurdling"}


def test_split_folders_of_mp4s_train(data):
    workdir = data / "run_videos"
    done = run_main("--config=configs/folder.py", f"--workdir={workdir}", "--mode=train",
                    f"--config.data.root={data / 'videos'}", "--config.data.kind=videos",
                    "--config.model.init_from=", "--config.train.num_steps=2",
                    "--config.train.val_every_steps=0", *TINY)
    assert "(video files)" in done.stderr and library_warnings(done.stderr) == []
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)


@pytest.fixture(scope="module")
def imported_tiny(data):
    """A `tiny` backbone imported from a torchvision-keyed .safetensors (random weights)."""
    rng = np.random.default_rng(0)
    state = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in iw.expected_torch_shapes("tiny").items()}
    for key in [k for k in state if k.endswith("running_var")]:
        state[key] = np.abs(state[key]) + 0.5
    save_file(state, str(data / "tiny.safetensors"))
    return iw.import_weights(data / "tiny.safetensors", "tiny", data / "weights_tiny")


def test_an_imported_backbone_is_evaluated_on_otam_lists_over_split_folders(data, imported_tiny):
    workdir = data / "eval_imported"  # does not exist: nothing was trained here
    done = run_main("--config=configs/ssv2_full.py", f"--workdir={workdir}", "--mode=eval",
                    f"--config.model.init_from={imported_tiny}", f"--config.data.root={data / 'ssv2'}",
                    f"--config.data.split_dir={data / 'lists'}", *TINY)
    assert "evaluating the backbone config.model.init_from=" in done.stderr  # a log message
    assert library_warnings(done.stderr) == []
    results = json.loads((workdir / "results.json").read_text())
    assert {r["scorer"] for r in results} == set(methods.names(learned=False))
    assert all(r["checkpoint_step"] == 0 and r["init_from"] == str(imported_tiny) for r in results)
    assert all(r["split"] == "test" and 0 <= r["accuracy"] <= 1 for r in results)


def test_eval_without_checkpoint_or_backbone_says_what_to_do(data, tmp_path):
    config = load_config("ssv2_full")
    config.data.root, config.data.split_dir = str(data / "ssv2"), str(data / "lists")
    config.model.arch, config.fewshot.way, config.fewshot.queries = "tiny", 2, 1
    config.data.num_frames, config.mesh.num_devices = 2, 1
    config.model.init_from = ""
    with pytest.raises(FileNotFoundError, match="or set --config.model.init_from=DIR to evaluate an"):
        eval_workdir.evaluate_workdir(config, str(tmp_path / "empty"))
    config.model.init_from = str(tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="is not a backbone directory: train first"):
        eval_workdir.evaluate_workdir(config, str(tmp_path / "empty"))


def test_tfds_builders_read_split_folders_and_lists_over_them(data):
    from tam_jax.data import tfds_builders
    from tam_jax.data.tfds_source import TfdsSource

    out = data / "tfds"
    tfds_builders.main(["kinetics100_fewshot", "--manual_dir", str(data / "frames"), "--data_dir", str(out),
                        "--num_workers", "1"])
    train_split = TfdsSource("kinetics100_fewshot", "train", data_dir=out)
    assert train_split.class_names == realdata.CLASSES["train"] and len(train_split) == 9
    frames = train_split.read(1, range(train_split.num_frames(1)))  # archery/v1: img_ + flow_, 7 frames
    np.testing.assert_array_equal(realdata.frame_numbers(frames), range(7))

    tfds_builders.main(["ssv2_fewshot", "--config", "full", "--manual_dir", str(data / "ssv2"),
                        "--split_dir", str(data / "lists"), "--data_dir", str(out), "--num_workers", "1",
                        "--short_side", "120", "--max_frames", "4"])
    test_split = TfdsSource("ssv2_fewshot/full_s120_f4", "test", data_dir=out)
    assert test_split.class_names == ("test0", "test1") and len(test_split) == 6
    assert test_split.read(1, [0]).shape == (1, 120, 176, 3)  # 240 x 351 -> 120 x 175.5
