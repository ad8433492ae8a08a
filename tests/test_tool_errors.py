"""Bad input to the tools' command lines: one `error:` line naming the input and the fix, a non-zero exit
status, no traceback; and `tam_jax.errors.run_command`, which every command runs its body through."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tam_jax import errors, predict, visualize
from tam_jax.tools import import_weights
from tests.helpers import REPO
from tests.test_predict import trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def check_error(err: str, *words: str) -> None:
    """`err` reports an error, without a traceback, naming each of `words`."""
    assert "error:" in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------------------------------
# run_command


def test_run_command_reports_a_user_error_in_one_line(capsys):
    def body():
        raise errors.UserError("--flag=x: expected y")

    assert errors.run_command(body) == errors.USER_ERROR_STATUS == 1
    assert capsys.readouterr().err == "error: --flag=x: expected y\n"
    assert errors.run_command(lambda: None) == 0 and errors.run_command(lambda: 3) == 3


def test_run_command_reports_a_bug_in_one_line_and_shows_the_traceback_when_asked(capsys, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_VARIABLE, raising=False)
    assert errors.run_command(lambda: 1 / 0) == errors.BUG_STATUS == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: internal error in tam_jax")
    assert "ZeroDivisionError" in err and "TAM_JAX_TRACEBACK" in err and "Traceback" not in err
    monkeypatch.setenv(errors.TRACEBACK_VARIABLE, "1")
    with pytest.raises(ZeroDivisionError):
        errors.run_command(lambda: 1 / 0)


# ----------------------------------------------------------------------------------------------------
# tam_jax.predict


@pytest.mark.parametrize("flag, value", [("--top", "0"), ("--top", "-2"), ("--devices", "-1")])
def test_predict_rejects_a_bad_count_before_loading_anything(flag, value, tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "no_such_run"), "--support", str(tmp_path), "--query", "q.mp4",
            "--json", str(tmp_path / "out.json"), flag, value]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    assert exit_info.value.code == 2
    check_error(capsys.readouterr().err, f"argument {flag}", value)


def test_predict_exits_1_when_no_query_can_be_read_and_still_writes_the_json(run, tmp_path, capsys):
    missing, out = str(tmp_path / "missing.mp4"), tmp_path / "out.json"
    argv = ["--checkpoint", str(run.workdir), "--support", str(run.support), "--no-progress",
            "--query", run.corrupt, missing, "--json", str(out)]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    check_error(err, "none of the 2 queries could be read", str(out), "--query", run.corrupt, missing)
    payload = json.loads(out.read_text())
    assert payload["predictions"] == [] and [e["path"] for e in payload["errors"]] == [run.corrupt, missing]


def test_predict_warns_once_about_a_support_set_of_one_class(run, tmp_path, capsys):
    support = tmp_path / "support"
    shutil.copytree(run.support / run.classes[0], support / "only")
    argv = ["--checkpoint", str(run.workdir), "--support", str(support), "--no-progress",
            "--query", run.queries[0], "--save-support", str(tmp_path / "support.npz")]
    assert predict.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'only'" in warnings[0] and "two or more classes" in warnings[0]
    argv = ["--checkpoint", str(run.workdir), "--support-cache", str(tmp_path / "support.npz"),
            "--no-progress", "--query", run.queries[0]]
    assert predict.main(argv) == 0  # the same from a support cache
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'only'" in warnings[0]


# ----------------------------------------------------------------------------------------------------
# tam_jax.visualize


def test_visualize_names_a_results_file_that_is_not_json(tmp_path, capsys):
    results = tmp_path / "notes.json"
    results.write_text("these are my notes\n")
    assert visualize.main(["lambda", "--results", str(results), "--out", str(tmp_path / "x.png")]) == 1
    check_error(capsys.readouterr().err, str(results), "not a results JSON written by `visualize lambda`")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [["lambda", "--lams", "0,-0.1"], ["lambda", "--lams=-1"],
                                  ["pair", "--lam=-0.5", "--query", "q.mp4", "--support", "s.mp4"]])
def test_visualize_rejects_a_negative_lambda_before_loading_anything(argv, tmp_path, capsys):
    argv = [*argv, "--checkpoint", str(tmp_path / "no_such_run"), "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(argv)
    assert exit_info.value.code == 2
    check_error(capsys.readouterr().err, "argument --lam", "must be >= 0")


def test_visualize_lambda_no_progress_shows_no_bar(run, tmp_path, capsys):
    out = tmp_path / "lambda.png"
    argv = ["lambda", "--checkpoint", str(run.workdir), "--lams", "0.1", "--episodes", "4",
            "--out", str(out), "--no-progress"]
    assert visualize.main(argv) == 0
    err = capsys.readouterr().err
    assert "Loading videos" not in err and "%|" not in err and "it/s" not in err, err


# ----------------------------------------------------------------------------------------------------
# tam_jax.tools.import_weights


def test_import_weights_names_a_text_file_that_claims_to_be_safetensors(tmp_path, capsys):
    src = tmp_path / "x.safetensors"
    src.write_text("not weights at all\n")
    assert import_weights.main(["--src", str(src), "--arch", "resnet18", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    check_error(err, f"not a safetensors file: {src}")
    assert err.startswith("error: ") and err.count("\n") == 1


def test_import_weights_says_a_directory_src_is_a_directory(tmp_path, capsys):
    src = tmp_path / "resnet18_download"
    src.mkdir()
    assert import_weights.main(["--src", str(src), "--arch", "resnet18", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    check_error(err, str(src), "is a directory", "the weights file inside it")
    assert err.startswith("error: ") and "does not exist" not in err


# ----------------------------------------------------------------------------------------------------
# tam_jax.reproduce (absl: run as a subprocess)


@pytest.mark.e2e
@pytest.mark.parametrize("flag, words", [
    ("--shots=abc", ["error: --shots=abc: expected comma-separated integers, e.g. --shots=1,5"]),
    ("--scorers=bogus", ["--scorers=bogus", "bogus is not a row of Table 1", "tsn, cmn, trn, tam"]),
])
def test_reproduce_names_a_bad_flag_before_any_compute(flag, words, tmp_path):
    workdir = tmp_path / "tables"
    command = [sys.executable, "-m", "tam_jax.reproduce", "--config=configs/demo.py", f"--workdir={workdir}",
               "--table=1", flag]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1, result.stderr
    check_error(result.stderr, *words)
    assert not workdir.exists()


# ----------------------------------------------------------------------------------------------------
# tam_jax.data.tfds_builders


def test_tfds_builders_names_a_missing_manual_dir(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    from tam_jax.data import tfds_builders

    manual = tmp_path / "no_videos_here"
    argv = ["kinetics100_fewshot", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "tfds")]
    assert tfds_builders.main(argv) == 1
    check_error(capsys.readouterr().err, "--manual_dir", str(manual), "does not exist")
