"""Few-shot prediction end to end: a tiny trained checkpoint, demo clips written to disk as MP4 files and
frame folders, `tam_jax.predict` in process and as a subprocess, the Python API, the support cache."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tam_jax import alignment, inference, methods, predict, train
from tam_jax.checkpoints import resolve_checkpoint
from tam_jax.inference import (
    CheckpointMismatchError,
    FewShotClassifier,
    SupportSet,
    class_distances,
    load_trained_model,
)
from tests import helpers
from tests.helpers import REPO


def tiny_config():
    """The shared tiny demo config, trained for two steps of one episode on one device."""
    config = helpers.tiny_config(num_steps=2)
    config.train.episodes_per_step = 1
    config.train.checkpoint_every_steps = 1
    config.train.val_every_steps = 0
    config.eval.episodes_per_batch = 8
    config.mesh.num_devices = 1
    return config


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained workdir and clips of three unseen (test-split) classes on disk."""

    workdir: Path
    support: Path  # <class>/<clip>: class 0 an MP4 and a frame folder, class 1 a frame folder, class 2 three
    queries: tuple[str, ...]  # an MP4, a frame folder, an MP4 (classes 0, 1, 2)
    corrupt: str  # a truncated MP4
    classes: tuple[str, ...]


QUERIES = ("q0.mp4", "q1", "q2.mp4")  # of classes 0, 1, 2: an MP4, a frame folder, an MP4


def trained_run(tmp_path_factory) -> Run:
    """Trained once per test run (tests/conftest.py `built_once`); test_visualize and test_tool_errors
    share it."""
    from tests.conftest import built_once

    root = built_once(tmp_path_factory, "predict", write_trained_run)
    classes = tuple(json.loads((root / "classes.json").read_text()))
    return Run(root / "run", root / "support", tuple(str(root / "query" / name) for name in QUERIES),
               str(root / "query" / "corrupt.mp4"), classes)


def write_trained_run(root: Path) -> None:
    """`tiny_config()` trained in root/run; clips of three test classes in root/support and root/query."""
    from tam_jax.data.demo import DemoConfig, demo_splits, render_video
    from tam_jax.data.frames import write_frame_folder
    from tam_jax.data.videos import write_video

    config = tiny_config()
    train.train(config, str(root / "run"))
    demo = DemoConfig(**config.data.demo.to_dict())
    classes = demo_splits(demo)["test"].classes[:3]
    (root / "classes.json").write_text(json.dumps(list(classes)))

    def write_clip(path, c, video):  # an MP4 or, without the suffix, a frame folder
        frames = render_video(demo, classes[c], video)
        (write_video if path.suffix == ".mp4" else write_frame_folder)(path, frames)

    layout = {0: ("a.mp4", "b"), 1: ("a",), 2: ("a.mp4", "b.mp4", "c")}
    for c, names in layout.items():
        for video, name in enumerate(names):
            write_clip(root / "support" / classes[c] / name, c, video)
    query = root / "query"
    for c, name in enumerate(QUERIES):
        write_clip(query / name, c, 5)
    data = (query / "q0.mp4").read_bytes()  # cut: the MP4 index (moov) is at the end, so it cannot be opened
    (query / "corrupt.mp4").write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def check_schema(payload, queries, classes):
    assert set(payload) == {"predictions", "errors"}
    assert [p["query"] for p in payload["predictions"]] == list(queries)
    for prediction in payload["predictions"]:
        assert set(prediction) == {"query", "ranking"}
        assert sorted(r["class"] for r in prediction["ranking"]) == sorted(classes)
        distances = [r["distance"] for r in prediction["ranking"]]
        assert all(isinstance(d, float) and np.isfinite(d) for d in distances)
        assert distances == sorted(distances)
    for error in payload["errors"]:
        assert set(error) == {"path", "error"} and error["error"]


def test_cli_classifies_reports_bad_queries_and_reuses_the_support_cache(run, tmp_path, capsys):
    missing = str(tmp_path / "no_such_clip.mp4")
    cache = tmp_path / "cache" / "support.npz"
    argv = ["--checkpoint", str(run.workdir), "--support", str(run.support), "--no-progress",
            "--query", run.queries[0], run.corrupt, run.queries[1], missing, run.queries[2],
            "--json", str(tmp_path / "out.json"), "--save-support", str(cache)]
    assert predict.main(argv) == 0
    out, err = capsys.readouterr()
    payload = json.loads((tmp_path / "out.json").read_text())
    check_schema(payload, run.queries, run.classes)
    assert [e["path"] for e in payload["errors"]] == [run.corrupt, missing]
    assert run.corrupt in err and missing in err and "no such video file or frame folder" in err
    assert all(q in out for q in run.queries) and run.corrupt not in out

    # The cache round trip: the same distances without reading the support clips again.
    argv = ["--checkpoint", str(run.workdir), "--support-cache", str(cache), "--no-progress",
            "--query", *run.queries, "--json", str(tmp_path / "cached.json")]
    assert predict.main(argv) == 0
    assert json.loads((tmp_path / "cached.json").read_text()) == {**payload, "errors": []}

    support = SupportSet.load(cache)
    assert support.class_names == tuple(sorted(run.classes))  # class folders in name order
    counts = dict(zip(support.class_names, np.bincount(support.labels).tolist(), strict=True))
    assert counts == {run.classes[0]: 2, run.classes[1]: 1, run.classes[2]: 3}
    assert support.embeddings.shape[:2] == (6, 4) and support.embeddings.dtype == np.float32
    assert support.metadata["arch"] == "tiny" and support.metadata["num_frames"] == 4
    assert support.metadata["checkpoint_step"] == 2 and support.metadata["scorer"] == "tam"


@pytest.mark.e2e
def test_subprocess_writes_the_same_predictions(run, tmp_path):
    expected = FewShotClassifier.from_checkpoint(run.workdir, progress=False).fit(run.support)
    expected.support.save(tmp_path / "support.npz")
    ranking = expected.predict(run.queries[0]).predictions[0].ranking
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "tam_jax.predict", "--checkpoint", str(run.workdir), "--support-cache",
               str(tmp_path / "support.npz"), "--query", run.queries[0], run.corrupt, "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr
    assert run.queries[0] in result.stdout and run.corrupt in result.stderr
    payload = json.loads(out.read_text())
    check_schema(payload, run.queries[:1], run.classes)
    got = [(r["class"], r["distance"]) for r in payload["predictions"][0]["ranking"]]
    assert [c for c, _ in got] == [c for c, _ in ranking]
    np.testing.assert_allclose([d for _, d in got], [d for _, d in ranking], rtol=1e-5)


def test_python_api_with_a_mapping_a_step_folder_and_hard_tam(run, tmp_path):
    step_one = run.workdir / "checkpoints" / "1"
    classifier = FewShotClassifier.from_checkpoint(step_one, lam=0.0, progress=False)
    assert classifier.model.step == 1 and classifier.settings == {
        "scorer": "tam", "lam": 0.0, "bidirectional": False}
    with pytest.raises(RuntimeError, match="fit"):
        classifier.predict(run.queries[0])
    with pytest.raises(ValueError, match="'trn' is a learned method.*holds no parameters for it"):
        FewShotClassifier(classifier.model, scorer="trn")
    only_clip = str(run.support / run.classes[1] / "a")
    support = {
        "first": [str(run.support / run.classes[0] / "a.mp4"), run.corrupt],
        "second": [only_clip],
    }
    classifier.fit(support)
    assert [e.path for e in classifier.support_errors] == [run.corrupt]
    result = classifier.predict([only_clip, run.queries[0], str(tmp_path / "missing")])
    assert [p.query for p in result.predictions] == [only_clip, run.queries[0]]
    assert [e.path for e in result.errors] == [str(tmp_path / "missing")]
    # A query that is a support clip: hard TAM aligns it with itself at distance 0, the nearest class.
    first = result.predictions[0]
    assert first.label == "second" and first.ranking[0][1] == pytest.approx(0, abs=1e-5)
    assert first.ranking[1][1] > 1e-3


def test_a_bad_scoring_choice_fails_before_the_checkpoint_is_restored(run, monkeypatch):
    def restore(*args, **kwargs):
        raise AssertionError("restored before the scoring settings were checked")

    monkeypatch.setattr(inference, "load_trained_model", restore)
    for chosen, message in [
        (dict(scorer="trn"), re.escape(f"'trn' is a learned method, and checkpoint {run.workdir} holds no")),
        (dict(scorer="bogus"), "Unknown scorer 'bogus'; the registered methods are"),
        (dict(lam=-1.0), "lam must be >= 0"),
        (dict(scorer="mean", bidirectional=True), "bidirectional applies to scorer 'tam' only"),
    ]:
        with pytest.raises(ValueError, match=message):
            FewShotClassifier.from_checkpoint(run.workdir, **chosen)
    with pytest.raises(AssertionError, match="restored"):  # a good choice goes on to the restore
        FewShotClassifier.from_checkpoint(run.workdir, scorer="mean", lam=0.0)


def test_a_support_class_without_a_readable_clip_is_an_error_naming_it(run, tmp_path, capsys):
    support = tmp_path / "support"
    shutil.copytree(run.support / run.classes[0], support / "good")
    (support / "broken").mkdir()
    shutil.copy(run.corrupt, support / "broken" / "x.mp4")
    (support / "empty").mkdir()
    argv = ["--checkpoint", str(run.workdir), "--support", str(support), "--query", run.queries[0],
            "--no-progress"]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert "'broken'" in err and "'empty'" in err and "'good'" not in err and "x.mp4" in err


def test_a_support_cache_of_another_model_is_refused_saying_what_differs(run, tmp_path, capsys):
    cache = tmp_path / "support.npz"
    FewShotClassifier.from_checkpoint(run.workdir, progress=False).fit(run.support).support.save(cache)

    def rewrite(**changes):
        with np.load(cache) as f:
            arrays = dict(f)
        metadata = {**json.loads(str(arrays["metadata"])), **changes}
        arrays["metadata"] = np.array(json.dumps(metadata))
        path = tmp_path / f"changed_{len(changes)}_{next(iter(changes))}.npz"
        np.savez(path, **arrays)
        return path

    cases = [
        (run.workdir, rewrite(arch="resnet18"), ["architecture", "'resnet18'", "'tiny'"]),
        (run.workdir, rewrite(num_frames=8), ["frame count", "8 frames", "of 4"]),
        (run.workdir, rewrite(image_size=32), ["crop size"]),
        (run.workdir / "checkpoints" / "1", cache, ["other weights", "step 2", "step 1"]),
    ]
    for checkpoint, path, phrases in cases:
        argv = ["--checkpoint", str(checkpoint), "--support-cache", str(path), "--query", run.queries[0],
                "--no-progress"]
        assert predict.main(argv) == 1
        err = capsys.readouterr().err
        assert str(path) in err and "--save-support" in err
        for phrase in phrases:
            assert phrase in err, (phrase, err)


def test_checkpoint_resolution_and_a_checkpoint_that_does_not_fit_its_config(run, tmp_path, monkeypatch):
    checkpoints = run.workdir / "checkpoints"
    assert resolve_checkpoint(run.workdir) == (run.workdir, checkpoints, 2)  # no val accuracy: the latest
    assert resolve_checkpoint(checkpoints) == (run.workdir, checkpoints, 2)
    assert resolve_checkpoint(checkpoints / "1") == (run.workdir, checkpoints, 1)
    monkeypatch.setattr("tam_jax.checkpoints.CheckpointManager.best_step", lambda self: 1)
    assert resolve_checkpoint(run.workdir)[2] == 1  # the best by validation accuracy
    with pytest.raises(FileNotFoundError, match="training workdir"):
        resolve_checkpoint(run.support)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")

    copy = tmp_path / "copy"
    shutil.copytree(run.workdir, copy, ignore=shutil.ignore_patterns("tensorboard"))
    config = json.loads((copy / "config.json").read_text())
    config["model"]["arch"] = "resnet18"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="model.arch='resnet18'"):
        load_trained_model(copy / "checkpoints" / "2")


def test_class_distances_average_any_number_of_clips_per_class():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(3, 5, 8)).astype(np.float32)
    support = rng.normal(size=(6, 5, 8)).astype(np.float32)
    equal = np.repeat(np.arange(3), 2)
    frame_distances = alignment.cosine_distance(query[:, None], support[None])
    for bidirectional in (False, True):  # class-major, 2 clips each: the mean of each class's 2 clips
        per_clip = np.asarray(alignment.tam_distance(frame_distances, lam=0.1, bidirectional=bidirectional))
        got = class_distances(query, support, equal, 3, method=method("tam", bidirectional=bidirectional))
        np.testing.assert_allclose(got, per_clip.reshape(3, 3, 2).mean(-1), rtol=1e-5, atol=1e-6)

    labels = np.array([2, 0, 0, 0, 1, 2])  # 3, 1 and 2 clips, in any order
    # lam = 0, the hard minimum (alignment.pairwise_distance would trace lam and give NaN).
    per_clip = np.asarray(jax.jit(alignment.tam_distance, static_argnames="lam")(
        alignment.cosine_distance(query[:, None], support[None]), lam=0))
    expected = np.stack([per_clip[:, labels == c].mean(axis=1) for c in range(3)], axis=1)
    got = class_distances(query, support, labels, 3, method=method("tam", lam=0.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    pooled = jax.numpy.mean(support, axis=1)
    prototypes = np.stack([pooled[labels == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(
        class_distances(query, support, labels, 3, method=method("tsn")),
        alignment.cosine_distance(query.mean(axis=1), prototypes), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="support clip"):
        class_distances(query, support, labels, 4, method=method("tam"))


def method(name: str, *, lam: float = 0.1, bidirectional: bool = False):
    """The registered method `name` at these alignment settings."""
    config = tiny_config()
    config.alignment.lam, config.alignment.bidirectional = lam, bidirectional
    return methods.build(name, config)
