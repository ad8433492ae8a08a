"""Frames per second of the full TAM train step and of inference embedding, against a PyTorch equivalent.

    python benchmarks/train_throughput.py [--episodes_per_step 1,2,4] [--out FILE.json]
    python benchmarks/train_throughput.py --arch tiny --image_size 32 --num_frames 4 \
        --episodes_per_step 1 --embed_batch_size 4 --steps 2      # a quick run on a CPU

Ours: `tam_jax.train_step.make_train_step` with `tam_jax.configuration.default_config()` (the paper's setting:
ResNet-50, T=8, 224 px crops, TAM with lam=0.1, SGD lr 0.001 momentum 0.9), 5-way 5-shot with 5 queries
per class, bfloat16 computation with float32 parameters (`--arch`, `--image_size`, `--num_frames`, `--way`,
`--shot`, `--queries`, `--dtype` change it). The input is synthetic uint8 frames, sharded onto the device
once (`train_step.shard_batch`) and fed to every step, so no input pipeline is timed. The step is compiled
ahead of time and "first call" is that compile (for a function that is no `jax.jit` object, its first call,
compile included). After `--warmup` steps, a figure is the median over `--steps`
steps each followed by `block_until_ready`; "pipelined" is the mean of `--steps` steps issued back to back
(as the training loop runs them) with one wait at the end. Frames per step = episodes * (way*shot +
way*queries) * T, for each value of `--episodes_per_step`.

Inference: `embedding.inference_apply(model)` on uint8 `[B, T, H, W, 3]` already on the device, for each
B of `--embed_batch_size` (videos), timed the same way.

Peak device memory: `peak_bytes_in_use` of `jax.devices()[0].memory_stats()`, n/a on a CPU. JAX cannot reset
that peak, so it is the process's peak so far: the train sweep runs from the smallest batch up, so each
train row's figure is its own, while the embedding rows, measured after it, show the largest train step's.
XLA's own estimate of each compiled function's memory (arguments + outputs + temporaries, from
`memory_analysis()`) is given alongside.

Where the time goes (`--parts`, on by default): at the largest episodes per step that ran, each part of the
step alone: the backbone's forward and backward (BatchNorm in training mode, input normalisation
included), the alignment and loss forward and backward on ready-made features (`train_step.episode_loss` with
the embedder replaced by the identity), and the optimiser update. Input costs nothing here by construction
(the batch is on the device); host round trips show as the gap between the blocked and pipelined figures.

PyTorch (when torch and torchvision are importable; `--torch off` skips it): benchmarks/otam_torch.py, the
same shapes with a torchvision ResNet (weights=None), channels_last, bf16 autocast, SGD momentum and the
public OTAM loss (bidirectional; see that file). `--torch_arch auto` takes the same architecture, or
resnet18 for our CPU-test-only "tiny" (torchvision has none), so the tiny comparison is not like for like.
It runs in a subprocess before JAX initialises the GPU, so the two never share device memory.
`--torch_compile` wraps its forward pass and loss in torch.compile.
Our TAM runs bidirectional too by default (`--no-bidirectional`: one direction, the paper's Eq. 7, for both).

Prints markdown tables (frames per second, the ratio ours / torch, the parts) and the versions; `--out`
writes it all as JSON, rewritten after every measurement so that a run stopped early keeps what it measured.
Nothing new starts after `--max_seconds`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# JAX takes 75% of GPU memory at start by default; PyTorch has finished (in its own process) by the time JAX
# starts, so let JAX have nearly all of it. A user's own setting wins. No effect on a CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tam_jax import embedding, fewshot, hosts, models, train_state, train_step  # noqa: E402
from tam_jax.configuration import default_config  # noqa: E402

TORCH_SCRIPT = Path(__file__).resolve().with_name("otam_torch.py")
GIB = 2**30


# ----------------------------------------------------------------------------------------------------
# Settings and input.


def make_config(args: argparse.Namespace, episodes: int):
    """default_config() (the paper's) with this run's shapes, on `args.num_devices` devices."""
    config = default_config()
    config.model.arch = args.arch
    config.model.dtype = args.dtype
    config.data.num_frames = args.num_frames
    config.data.image_size = args.image_size
    config.data.resize = max(config.data.resize, args.image_size)
    config.fewshot.way = args.way
    config.fewshot.shot = args.shot
    config.fewshot.queries = args.queries
    config.alignment.lam = args.lam
    config.alignment.bidirectional = args.bidirectional
    config.train.episodes_per_step = episodes
    # 0: one micro-batch of all the step's episodes on each device (no accumulation), as before issue 13.
    per_device = episodes // max(1, args.num_devices) if args.num_devices else episodes // jax.device_count()
    config.train.episodes_per_device_step = args.episodes_per_device_step or max(1, per_device)
    config.model.remat = args.remat
    config.train.embed_chunks = 1
    config.mesh.num_devices = args.num_devices
    return config


def synthetic_batch(config, episodes: int, seed: int = 0) -> dict:
    """Random uint8 episodes in the layout of `train_step.episode_loss`'s batch."""
    rng = np.random.default_rng(seed)
    way, shot, queries = config.fewshot.way, config.fewshot.shot, config.fewshot.queries
    clip = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
    return {
        "support": rng.integers(0, 256, (episodes, way * shot, *clip), dtype=np.uint8),
        "query": rng.integers(0, 256, (episodes, way * queries, *clip), dtype=np.uint8),
        "query_labels": np.tile(np.repeat(np.arange(way), queries), (episodes, 1)).astype(np.int32),
    }


def videos_per_episode(args) -> int:
    return args.way * (args.shot + args.queries)


# ----------------------------------------------------------------------------------------------------
# Timing.


def measure(call, steps: int, warmup: int) -> dict:
    """Warm-up calls, then the median of blocked calls and the mean of back-to-back calls, in seconds.

    `call()` returns what it computed; blocking on the last of a run of calls waits for all of them, since
    they run in order on the device.
    """
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - start) / steps
    return {"median_step_s": statistics.median(times), "pipelined_step_s": pipelined}


def compile_ahead(jitted, *example_args):
    """(compiled function, seconds to lower and compile, XLA's memory estimate in bytes or None).

    A function that cannot be compiled ahead (not a `jax.jit` object) comes back as it is, with None for
    the seconds: its first call then compiles it.
    """
    if not hasattr(jitted, "lower"):
        return jitted, None, None
    start = time.perf_counter()
    compiled = jitted.lower(*example_args).compile()
    seconds = time.perf_counter() - start
    try:
        stats = compiled.memory_analysis()
        estimate = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        estimate -= stats.alias_size_in_bytes
    except Exception:  # not every backend reports it
        estimate = None
    return compiled, seconds, estimate


def first_call(call) -> float:
    """Seconds of one blocked call (for a function not compiled ahead, its compile is in it)."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def peak_bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def rates(row: dict) -> dict:
    row["frames_per_s"] = row["frames_per_step"] / row["median_step_s"]
    row["pipelined_frames_per_s"] = row["frames_per_step"] / row["pipelined_step_s"]
    return row


# ----------------------------------------------------------------------------------------------------
# Our measurements.


class JaxBench:
    """Our model, optimiser and train state, built once and reused by every measurement."""

    def __init__(self, args):
        self.args = args
        self.config = make_config(args, 1)
        self.mesh = hosts.make_mesh(self.config.mesh.num_devices)
        self.model = models.build_embedder(self.config.model)
        self.optimizer = train_state.make_optimizer(self.config)
        self.state = None

    def fresh_state(self):
        if self.state is None:
            self.state = train_state.create_train_state(self.config, self.model, self.optimizer, self.mesh)
        return self.state

    def train(self, episodes: int) -> dict:
        config = make_config(self.args, episodes)
        row = {"framework": "jax", "mode": "train", "batch": episodes,
               "frames_per_step": episodes * videos_per_episode(self.args) * self.args.num_frames}
        batch = train_step.shard_batch(synthetic_batch(config, episodes), self.mesh)
        step = train_step.make_train_step(config, self.model, self.optimizer, self.mesh)
        state = self.fresh_state()
        self.state = None  # donated to the step from here on
        compiled, row["first_call_s"], row["xla_estimate_bytes"] = compile_ahead(step, state, batch)
        metrics = None

        def call():
            nonlocal state, metrics
            state, metrics = compiled(state, batch)
            return state, metrics

        if row["first_call_s"] is None:
            row["first_call_s"] = first_call(call)
        row.update(measure(call, self.args.steps, self.args.warmup))
        self.state = state
        row["peak_bytes"] = peak_bytes_in_use()
        row["loss"] = float(metrics["loss"])
        return rates(row)

    def embed(self, videos: int) -> dict:
        row = {"framework": "jax", "mode": "embed", "batch": videos,
               "frames_per_step": videos * self.args.num_frames}
        size = self.args.image_size
        frames = np.random.default_rng(1).integers(
            0, 256, (videos, self.args.num_frames, size, size, 3), dtype=np.uint8
        )
        frames = train_step.shard_batch({"frames": frames}, self.mesh)["frames"]
        variables = train_state.embedder_variables(self.fresh_state())
        embed = embedding.inference_apply(self.model)
        compiled, row["first_call_s"], row["xla_estimate_bytes"] = compile_ahead(embed, variables, frames)
        call = lambda: compiled(variables, frames)
        if row["first_call_s"] is None:
            row["first_call_s"] = first_call(call)
        row.update(measure(call, self.args.steps, self.args.warmup))
        row["peak_bytes"] = peak_bytes_in_use()
        return rates(row)

    def parts(self, episodes: int) -> dict:
        """Seconds per call of the step's parts alone (see the module docstring)."""
        config = make_config(self.args, episodes)
        batch = train_step.shard_batch(synthetic_batch(config, episodes), self.mesh)
        state = self.fresh_state()
        params, batch_stats = state.params, state.batch_stats
        videos = jnp.concatenate([batch["support"], batch["query"]], axis=1)
        videos = videos.reshape((-1,) + videos.shape[2:])

        def backbone(params, batch_stats, videos):
            features, updates = self.model.apply(
                {"params": params["embedder"], "batch_stats": batch_stats}, videos, train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(features), updates

        dim = models.feature_dim(self.args.arch)
        rng = np.random.default_rng(2)
        features = {
            key: jnp.asarray(rng.standard_normal(batch[key].shape[:3] + (dim,)), jnp.float32)
            for key in ("support", "query")
        }

        def alignment(features, labels):
            def loss(features):
                joined = jnp.concatenate([features["support"], features["query"]], axis=1)
                logits = train_step.episode_logits({}, joined, features["support"].shape[1], config)
                return fewshot.cross_entropy(logits, labels)

            return jax.value_and_grad(loss)(features)

        grads = jax.tree.map(jnp.zeros_like, params)

        def update(grads, opt_state, params):
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        parts = {"episodes": episodes}
        for name, fn, fn_args in (
            ("backbone_fwd_bwd", jax.grad(backbone, has_aux=True), (params, batch_stats, videos)),
            ("alignment_loss_fwd_bwd", alignment, (features, batch["query_labels"])),
            ("optimizer_update", update, (grads, state.opt_state, params)),
        ):
            compiled, _, _ = compile_ahead(jax.jit(fn), *fn_args)
            timing = measure(lambda c=compiled, a=fn_args: c(*a), self.args.steps, self.args.warmup)
            parts[name + "_s"] = timing["median_step_s"]
        return parts


# ----------------------------------------------------------------------------------------------------
# PyTorch, in a subprocess.


def torch_arch(args) -> str:
    if args.torch_arch != "auto":
        return args.torch_arch
    return "resnet18" if args.arch == "tiny" else args.arch


def torch_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


def run_torch(args, deadline: float) -> dict:
    """Run benchmarks/otam_torch.py with the same shapes; its JSON result, or {"skipped"/"error": why}."""
    if args.torch == "off":
        return {"skipped": "--torch off"}
    if not torch_available():
        return {"skipped": "torch or torchvision is not importable"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        command = [
            sys.executable, str(TORCH_SCRIPT), f"--arch={torch_arch(args)}",
            f"--image_size={args.image_size}", f"--num_frames={args.num_frames}", f"--way={args.way}",
            f"--shot={args.shot}", f"--queries={args.queries}", f"--dtype={args.dtype}", f"--lam={args.lam}",
            "--bidirectional" if args.bidirectional else "--no-bidirectional",
            "--parts" if args.parts else "--no-parts",
            "--episodes_per_step=" + ",".join(map(str, args.episodes_per_step)),
            "--embed_batch_size=" + ",".join(map(str, args.embed_batch_size)),
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--deadline_unix={deadline}",
            f"--threads={args.torch_threads}", f"--json_out={out}",
            *(["--compile"] if args.torch_compile else []),
        ]
        print("running", " ".join(command[1:]), flush=True)
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not os.path.exists(out):
            return {"error": f"{TORCH_SCRIPT.name} exited with status {completed.returncode}"}
        with open(out) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------
# Reporting.


def versions() -> dict:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "backend": jax.default_backend(), "device_kind": device.device_kind,
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """ours / torch frames per second, for each (mode, batch) that both measured."""
    measured = {(r["framework"], r["mode"], r["batch"]): r for r in rows if "frames_per_s" in r}
    out = []
    for (framework, mode, batch), ours in measured.items():
        theirs = measured.get(("torch", mode, batch))
        if framework == "jax" and theirs:
            out.append({"mode": mode, "batch": batch, "jax_frames_per_s": ours["frames_per_s"],
                        "torch_frames_per_s": theirs["frames_per_s"],
                        "jax_over_torch": ours["frames_per_s"] / theirs["frames_per_s"]})
    return out


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def rate(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_tables(result: dict) -> str:
    lines = [
        "| framework | mode | batch | frames/step | first call s | median ms/step | frames/s | "
        "pipelined frames/s | peak GiB | XLA estimate GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        unit = "episodes" if r["mode"] == "train" else "videos"
        if "frames_per_s" not in r:
            why = r.get("error") or r.get("skipped") or "not measured"
            lines.append(f"| {r['framework']} | {r['mode']} | {r['batch']} {unit} | {why[:80]} |")
            continue
        lines.append(
            f"| {r['framework']} | {r['mode']} | {r['batch']} {unit} | {r['frames_per_step']} | "
            f"{r['first_call_s']:.1f} | {1000 * r['median_step_s']:.1f} | {rate(r['frames_per_s'])} | "
            f"{rate(r['pipelined_frames_per_s'])} | {gib(r.get('peak_bytes'))} | "
            f"{gib(r.get('xla_estimate_bytes'))} |"
        )
    if result["ratios"]:
        lines += ["", "| mode | batch | ours frames/s | torch frames/s | ours / torch |",
                  "|---|---|---|---|---|"]
        for r in result["ratios"]:
            lines.append(f"| {r['mode']} | {r['batch']} | {rate(r['jax_frames_per_s'])} | "
                         f"{rate(r['torch_frames_per_s'])} | {r['jax_over_torch']:.2f}x |")
    parts = {"jax": result.get("jax_parts"), "torch": result.get("torch_parts")}
    if any(isinstance(p, dict) and "episodes" in p for p in parts.values()):
        lines += ["", "| framework | episodes | full step ms | backbone fwd+bwd ms | "
                  "alignment+loss fwd+bwd ms | optimiser ms |", "|---|---|---|---|---|---|"]
        for framework, p in parts.items():
            if not (isinstance(p, dict) and "episodes" in p):
                continue
            full = next((r["median_step_s"] for r in result["rows"] if r["framework"] == framework
                         and r["mode"] == "train" and r["batch"] == p["episodes"] and "median_step_s" in r),
                        float("nan"))
            lines.append(
                f"| {framework} | {p['episodes']} | {1000 * full:.1f} | "
                f"{1000 * p['backbone_fwd_bwd_s']:.1f} | {1000 * p['alignment_loss_fwd_bwd_s']:.1f} | "
                f"{1000 * p['optimizer_update_s']:.1f} |"
            )
    meta = result["meta"]
    torch_meta = result.get("torch_meta") or {}
    lines += ["", "jax {jax}, jaxlib {jaxlib}, flax {flax}, optax {optax}, python {python}; {backend}: "
              "{device_kind} x{device_count}".format(**meta)]
    if torch_meta:
        lines.append(", ".join(f"{k} {v}" for k, v in torch_meta.items()))
    lines.append(f"load average (1, 5, 15 min) at start / end: {meta['load_average_start']} / "
                 f"{meta.get('load_average_end')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The run.


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="tiny | resnet18 | resnet34 | resnet50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--queries", type=int, default=5, help="queries per class")
    p.add_argument("--episodes_per_step", type=int_list, default=[1, 2, 4], help="comma-separated, swept")
    p.add_argument("--embed_batch_size", type=int_list, default=[128], help="videos per call, swept")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="computation dtype")
    p.add_argument("--remat", default="none", help="model.remat: none | block | a checkpoint policy name")
    p.add_argument("--episodes_per_device_step", type=int, default=0,
                   help="train.episodes_per_device_step (0: all of a step's episodes at once)")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="time the step's parts alone at the largest episodes per step that ran")
    p.add_argument("--num_devices", type=int, default=1, help="data-parallel devices (0: all)")
    p.add_argument("--torch", choices=("auto", "off"), default="auto")
    p.add_argument("--torch_arch", default="auto",
                   help="a torchvision.models constructor; auto: --arch (tiny: resnet18)")
    p.add_argument("--torch_compile", action="store_true")
    p.add_argument("--torch_threads", type=int, default=0,
                   help="CPU threads for PyTorch (0: its default); 1 keeps it fast on a busy shared CPU")
    p.add_argument("--max_seconds", type=float, default=450, help="start nothing new after this many seconds")
    p.add_argument("--out", default=None, help="write the figures and versions as JSON here")
    return p


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    deadline = start + args.max_seconds
    result = {"settings": vars(args).copy(), "rows": [], "ratios": []}
    load_start = os.getloadavg()

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    # PyTorch first, before JAX initialises (and takes the memory of) the GPU; it gets part of the time.
    torch_result = run_torch(args, deadline=start + 0.4 * args.max_seconds)
    result["torch_meta"] = torch_result.get("meta")
    result["torch_parts"] = torch_result.get("parts")
    if "rows" not in torch_result:
        print(f"PyTorch: {torch_result}", flush=True)
    result["meta"] = {**versions(), "load_average_start": [round(x, 2) for x in load_start]}
    result["rows"] += torch_result.get("rows", [])
    save()

    bench = JaxBench(args)

    def attempt(what, fn, *fn_args):
        """One measurement; an error (out of memory, say) is recorded and the others go on."""
        if time.time() > deadline:
            print(f"jax {what}: skipped, past --max_seconds", flush=True)
            return {"skipped": "past --max_seconds"}
        try:
            return fn(*fn_args)
        except Exception as e:  # XLA reports out-of-memory as a runtime error
            bench.state = None  # it may have been donated
            print(f"jax {what}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    for episodes in sorted(args.episodes_per_step):
        row = attempt(f"train {episodes}", bench.train, episodes)
        result["rows"].append({"framework": "jax", "mode": "train", "batch": episodes, **row})
        print(f"jax train, {episodes} episodes/step: {rate(row.get('frames_per_s'))} frames/s", flush=True)
        save()
    for videos in sorted(args.embed_batch_size):
        row = attempt(f"embed {videos}", bench.embed, videos)
        result["rows"].append({"framework": "jax", "mode": "embed", "batch": videos, **row})
        print(f"jax embed, {videos} videos/call: {rate(row.get('frames_per_s'))} frames/s", flush=True)
        save()
    ran = [r["batch"] for r in result["rows"]
           if r["framework"] == "jax" and r["mode"] == "train" and "frames_per_s" in r]
    if args.parts and ran:
        result["jax_parts"] = attempt("parts", bench.parts, max(ran))
    result["ratios"] = ratios(result["rows"])
    result["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["wall_s"] = time.time() - start
    save()
    print()
    print(format_tables(result))
    if args.out:
        print(f"wrote {args.out}")
    return result


def main(argv=None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
