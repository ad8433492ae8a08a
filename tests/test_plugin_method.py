"""A method from outside the package: defined and registered here, trained and evaluated through
`python -m tam_jax.main` with `--config.plugins=test_plugin_method`, with no change to tam_jax/.

`ScaledPrototypes` learns one weight per feature channel, mean-pools the frames and compares the weighted
query with each class's weighted prototype by cosine distance: a few lines, on the public interface alone
(`tam_jax.methods`).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax import hosts, methods, models
from tam_jax.checkpoints import CheckpointManager
from tam_jax.config_checks import validate
from tam_jax.domains import above
from tests.helpers import REPO, flags_for, small_config


@methods.register
class ScaledPrototypes(methods.Method):
    name = "scaled_prototypes"
    learned = True
    defaults = {"init_scale": 1.0}
    domains = {"init_scale": above(0)}

    def init(self, rng, num_frames, feature_dim):
        return {"scale": jnp.full((feature_dim,), self.options.init_scale, jnp.float32)}

    def video_embeddings(self, params, frames):
        return jnp.mean(frames, axis=-2) * params["scale"]  # [N, T, D] -> [N, D]

    def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None):
        prototypes = methods.class_means(support, support_labels, num_classes)
        return methods.cosine_distance(query, prototypes)


def test_the_plugin_method_is_registered_with_checked_options():
    config = small_config()
    config.fewshot.scorer = "scaled_prototypes"
    validate(config)
    method = methods.build("scaled_prototypes", config)
    params = method.init(jax.random.key(0), 4, 8)
    frames = np.random.default_rng(0).normal(size=(6, 4, 8)).astype(np.float32)
    distances = method.class_distances(params, method.video_embeddings(params, frames[:2]),
                                       method.video_embeddings(params, frames), np.arange(6) % 3, 3)
    assert distances.shape == (2, 3)
    config.methods = {"scaled_prototypes": {"init_scale": -1.0}}
    with pytest.raises(ValueError, match=r"config\.methods\.scaled_prototypes\.init_scale: must be > 0"):
        validate(config)
    config.plugins = "no_such_module_anywhere"
    with pytest.raises(ValueError, match="config.plugins: cannot import 'no_such_module_anywhere'"):
        validate(config)


@pytest.mark.e2e  # a whole run of python -m tam_jax.main
def test_a_method_defined_outside_the_package_trains_and_evaluates_through_main(tmp_path):
    workdir = tmp_path / "run"
    flags = [*flags_for(small_config()), "--config.train.val_every_steps=0"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run(
        [sys.executable, "-m", "tam_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.plugins=test_plugin_method", "--config.fewshot.scorer=scaled_prototypes",
         "--config.methods.scaled_prototypes.init_scale=2.0", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["plugins"] == "test_plugin_method"
    assert saved["methods"]["scaled_prototypes"] == {"init_scale": 2.0}
    results = json.loads((workdir / "results.json").read_text())
    # The run's own learned method, and every parameter-free one, all from one embedding.
    assert {r["scorer"] for r in results} == {"scaled_prototypes", *methods.names(learned=False)}
    own = next(r for r in results if r["scorer"] == "scaled_prototypes")
    assert own["checkpoint_step"] == 4 and own["episodes"] == 16 and 0 <= own["accuracy"] <= 1
    manager = CheckpointManager(str(workdir / "checkpoints"))
    try:
        scale = np.asarray(manager.restore_saved(4, hosts.make_mesh(1))["params"]["head"]["scale"])
    finally:
        manager.close()
    assert scale.shape == (models.feature_dim("tiny"),) and not np.allclose(scale, 2.0)  # trained
