"""tam_jax.configuration: the defaults, config strings, and a saved config read back over the defaults."""

import json
import subprocess
import sys

import pytest

from tam_jax import evaluate, methods
from tam_jax.checkpoints import read_config
from tam_jax.configuration import apply_config_arg, config_from_json, default_config, eval_queries
from tam_jax.errors import ConfigError
from tests.helpers import REPO, load_config

CONFIGS = ("demo", "folder", "kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")


def test_a_saved_config_without_some_keys_reads_back_with_their_defaults(tmp_path):
    saved = load_config("demo").to_dict()
    del saved["eval"]["queries"], saved["train"]["memory_limit_gib"]
    saved["fewshot"]["scorer"] = "plain_dtw"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = read_config(tmp_path)
    defaults = default_config()
    assert config.eval.queries == defaults.eval.queries
    assert eval_queries(config) == saved["fewshot"]["queries"]
    assert config.train.memory_limit_gib == defaults.train.memory_limit_gib
    assert config.fewshot.scorer == "plain_dtw"  # what the file holds wins
    assert config.data.demo.videos_per_class == saved["data"]["demo"]["videos_per_class"]


def test_a_saved_value_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="num_steps"):
        config_from_json({"train": {"num_steps": 2.5}})


def test_default_scorers_are_every_method_without_parameters_then_the_runs_own():
    config = default_config()
    assert evaluate.eval_scorers(config) == ("tam", "plain_dtw", "diagonal", "mean", "min", "tsn")
    config.fewshot.scorer = "trx"
    assert evaluate.eval_scorers(config) == ("trx", "tam", "plain_dtw", "diagonal", "mean", "min", "tsn")


def test_saved_method_options_come_back_with_the_config():
    config = config_from_json({"methods": {"trx": {"dim": 64}}, "fewshot": {"scorer": "trx"}})
    assert config.methods.trx.dim == 64 and methods.build("trx", config).options.dim == 64


@pytest.mark.e2e
@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_build_without_importing_jax(name):
    """Building a config computes nothing: neither the package's config module nor a config file
    imports JAX, Orbax or TFDS."""
    code = (f"import importlib, sys; importlib.import_module('configs.{name}').get_config('shot=5'); "
            "heavy = [m for m in ('jax', 'orbax', 'tensorflow_datasets', 'flax') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_config_string_sets_shot_and_way_strictly():
    config = apply_config_arg(default_config(), "shot=5,way=10")
    assert (config.fewshot.shot, config.fewshot.way) == (5, 10)
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_config_arg(default_config(), "shot=2.5")
    with pytest.raises(ConfigError, match="is not one of shot=N, way=N"):
        apply_config_arg(default_config(), "queries=3")
