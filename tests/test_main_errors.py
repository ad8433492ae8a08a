"""Bad input to `python -m tam_jax.main`: one `error:` line naming the input and the fix, a non-zero exit
status, no traceback, checked before any compute and with nothing left behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tam_jax import config_checks, configuration
from tam_jax.config_checks import KEY_DOMAINS
from tam_jax.errors import ConfigError, UserError
from tam_jax.workdir_lock import hold_workdir
from tests.helpers import REPO, flags_for, load_config, tiny_config


def run_main(*args, devices=1):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TAM_JAX_TRACEBACK")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "tam_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_error(result, status, *words):
    """Exit `status`, no traceback, and an `error:` line holding every one of `words`."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


TINY = flags_for(tiny_config())

# (arguments after --config=configs/demo.py and the tiny overrides, exit status, words of the error line)
BAD_COMMANDS = [
    (["--config.fewshot.way=1"], 1, ["config.fewshot.way", ">= 2"]),
    (["--config.fewshot.shot=0"], 1, ["config.fewshot.shot", ">= 1"]),
    (["--config.alignment.lam=-1"], 1, ["config.alignment.lam", ">= 0"]),
    (["--config.data.num_frames=0"], 1, ["config.data.num_frames"]),
    (["--config.eval.checkpoint=newest"], 1, ["config.eval.checkpoint", "step number"]),
    (["--config.mesh.num_devices=2"], 1, ["config.mesh.num_devices=2", "set it to 1"]),
    (["--config.data.demo.height=15"], 1, ["config.data.demo.height", "even and >= 16"]),
    (["--config.data.kind=tfds", "--config.data.tfds_name=kinetics100_fewshot",
      "--config.data.tfds_data_dir=/nonexistent/tfds"], 1, ["'kinetics100_fewshot' is not built",
                                                            "tfds_builders"]),
    (["--config.data.kind=frames"], 1, ["config.data.root", "--config.data.root=DIR"]),
    (["--config.train.nonexistent=1"], 2, ["--config.train.nonexistent=1", "no key", "num_steps, optimizer"]),
    (["--config.train.num_step=10"], 2, ["num_step=10", "Did you mean --config.train.num_steps?"]),
    (["--config.fewshot.shot=abc"], 2, ["--config.fewshot.shot", "an integer"]),
    (["--config.train.learning_rate=fast"], 2, ["--config.train.learning_rate", "a number"]),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "status", "words"), BAD_COMMANDS, ids=lambda v: str(v)[:40])
def test_a_bad_config_is_one_line_before_anything_is_written(tmp_path, args, status, words):
    workdir = tmp_path / "run"
    result = run_main("--config=configs/demo.py", *TINY, f"--workdir={workdir}", *args)
    assert_one_error(result, status, *words)
    assert not workdir.exists()  # no workdir holding only run.lock


@pytest.mark.e2e
@pytest.mark.parametrize(("config_arg", "words"), [
    ("shot=abc", ["shot=abc", "an integer"]),
    ("shots=5", ["shots=5", "shot=N, way=N"]),
])
def test_a_bad_config_string_names_the_argument(tmp_path, config_arg, words):
    result = run_main(f"--config=configs/demo.py:{config_arg}", f"--workdir={tmp_path}", "--mode=plan")
    assert_one_error(result, 2, *words)


@pytest.mark.e2e
def test_a_missing_config_file_is_one_line(tmp_path):
    result = run_main("--config=configs/no_such.py", f"--workdir={tmp_path}")
    assert_one_error(result, 2, "--config=configs/no_such.py", "cannot load")


def test_the_config_string_takes_way_and_shot():
    for name in ("demo", "folder", "kinetics", "ssv2_full"):
        config = load_config(name, "shot=5,way=10")
        assert (config.fewshot.way, config.fewshot.shot) == (10, 5), name
    assert load_config("demo").fewshot.way == 5


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("False", True, False), ("true", False, True), ("0", True, False), ("7", 1, 7), ("2.5", 1.0, 2.5),
    ("x", "", "x"),
])
def test_typed_value_is_strict(text, default, expected):
    value = configuration.typed_value(text, default, "here")
    assert value == expected and type(value) is type(default)


@pytest.mark.parametrize(("text", "default"), [("2.5", 1), ("yes", True), ("abc", 1.0)])
def test_typed_value_refuses_what_is_not_of_the_type(text, default):
    with pytest.raises(ConfigError, match="here: expected"):
        configuration.typed_value(text, default, "here")


@pytest.mark.parametrize("key", list(KEY_DOMAINS))
def test_every_key_domain_is_checked_and_named(key):
    """Each key refuses some value of its type (the first of a few candidates its domain refuses), and the
    error names the key."""
    config = load_config()
    section, name = key.split(".")
    candidates = {int: [-1, 0, 1], float: [-1.0, 0.0, 1.0], str: ["no_such_choice"]}
    candidates = candidates[type(config[section][name])]
    refused = [v for v in candidates if not KEY_DOMAINS[key].accepts(v)]
    assert refused, key
    config[section][name] = refused[0]
    with pytest.raises(ConfigError, match=rf"^config\.{key}: must be"):
        config_checks.check_domains(config)


def test_the_shipped_configs_lie_inside_every_domain():
    for name in ("demo", "folder", "kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51"):
        config_checks.check_domains(load_config(name))


@pytest.mark.e2e
def test_a_workdir_that_cannot_be_used_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_error(run_main("--config=configs/demo.py", f"--workdir={a_file}"), 1,
                     f"--workdir={a_file}", "is a file")
    missing = tmp_path / "missing"
    assert_one_error(run_main("--config=configs/demo.py", f"--workdir={missing}", "--mode=eval"), 1,
                     f"--workdir={missing}", "does not exist")
    assert not missing.exists()  # eval does not create it


# ----------------------------------------------------------------------------------------------------
# A trained workdir (`trained`, tests/conftest.py: checkpoints at steps 2 and 4), copied: evaluation writes
# to it. Evaluation of another architecture, of a step number.


@pytest.mark.e2e
def test_eval_of_a_checkpoint_of_another_architecture_is_one_line(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    result = run_main("--config=configs/demo.py", *flags_for(config), f"--workdir={workdir}", "--mode=eval",
                      "--config.model.arch=resnet18")
    assert_one_error(result, 1, "model.arch='resnet18'", str(workdir))


@pytest.mark.e2e
def test_eval_checkpoint_takes_a_step_number(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    result = run_main("--config=configs/demo.py", *flags_for(config), f"--workdir={workdir}", "--mode=eval",
                      "--config.eval.checkpoint=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((workdir / "results.json").read_text())
    assert {r["checkpoint_step"] for r in records} == {2}
    result = run_main("--config=configs/demo.py", *flags_for(config), f"--workdir={workdir}", "--mode=eval",
                      "--config.eval.checkpoint=3")
    assert_one_error(result, 1, "config.eval.checkpoint=3", "saved steps: 2, 4")


def test_a_run_that_writes_nothing_leaves_no_workdir_behind(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(UserError), hold_workdir(new):
        assert (new / "run.lock").exists()
        raise UserError("stopped before writing anything")
    assert not new.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError), hold_workdir(existing):
        raise UserError("stopped")
    assert existing.is_dir()  # a folder the user made stays
    with hold_workdir(new):
        (new / "config.json").write_text("{}")
    assert (new / "config.json").exists()  # a workdir with output stays
