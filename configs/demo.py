"""The generated demo dataset: trains and evaluates on a 2-core CPU in a few minutes, no download.

    python -m tam_jax.main --config=configs/demo.py --workdir=runs/demo

Classes differ only in the temporal order of the same visual steps (see `tam_jax.data.demo`), so the
order-blind scorers (mean, tsn) stay near chance and the alignment scorers do not. A tiny ResNet is trained
from scratch on 32-pixel crops; the optimiser, learning rate and temperature were chosen by experiment
(README, "The demo").
"""

import dataclasses

import ml_collections

from tam_jax.configuration import apply_config_arg, default_config
from tam_jax.data.demo import DemoConfig


def get_config(arg=None):
    c = default_config()
    c.data.kind = "demo"
    c.data.demo = ml_collections.ConfigDict(dataclasses.asdict(DemoConfig()))  # every field overridable
    c.data.resize = 40
    c.data.image_size = 32
    c.data.num_threads = 2
    c.model.arch = "tiny"
    c.fewshot.queries = 3
    c.fewshot.temperature = 1.0  # the paper's; 0.1 learned slower here (benchmarks/README.md, "The demo")
    c.train.num_steps = 300
    c.train.episodes_per_step = 4
    c.train.optimizer = "adam"  # the paper's SGD at lr 0.001 barely moves a network trained from scratch
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 100
    c.train.val_every_steps = 100
    c.train.val_episodes = 200
    c.eval.num_episodes = 10_000  # the paper's protocol; about ten seconds on cached embeddings
    c.eval.embed_batch_size = 64
    return apply_config_arg(c, arg)  # shot=N, way=N
