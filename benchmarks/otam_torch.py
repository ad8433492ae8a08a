"""The PyTorch reference step of benchmarks/train_throughput.py: torchvision ResNet, public OTAM loss.

    python benchmarks/otam_torch.py --arch resnet50 --episodes_per_step 1,2,4 --json_out FILE.json

What one train step does, the way public PyTorch OTAM code trains:
- uint8 frames `[E * (way*shot + way*queries) * T, H, W, 3]`, already on the device, are scaled to [0, 1],
  normalised with the ImageNet mean and std and viewed as NCHW in channels_last memory format;
- a torchvision ResNet (weights=None, classifier replaced by the identity) embeds every frame under
  `torch.autocast(device, dtype=torch.bfloat16)` (float32 parameters), BatchNorm in training mode;
- the loss, in float32: frame distances 1 - cos between every query and support video, the OTAM
  cumulative distance (`otam_cumulative_distance`) in both directions, summed, a class's distance the
  mean over its shots, cross-entropy on the negative class distances;
- backward and an SGD step (lr 0.001, momentum 0.9).
Also inference embedding (eval mode, inference_mode, autocast) and, at one batch size, the parts of the
step alone (backbone forward+backward, loss on ready features, optimiser step).

Timing: the first call is reported apart (cudnn.benchmark picks its algorithms there, torch.compile
compiles there); then warm-up calls; then the median of `--steps` calls, each followed by a device
synchronisation, and the mean of `--steps` calls issued back to back with one synchronisation at the end.

train_throughput.py runs this file in a subprocess, before JAX touches the GPU, so that the two frameworks
never hold device memory at the same time and each one's peak memory is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# The OTAM loss.


def otam_cumulative_distance(
    dists: torch.Tensor, lam: float = 0.1, public_columns: bool = True
) -> torch.Tensor:
    """OTAM's accumulated alignment cost of `[B, L, M]` frame distances (L query frames, M support frames).

    The support axis gets one zero column on each side (M + 2 columns). Row 0 accumulates from the left
    (a running sum). In every later row, column 0 stays 0, and cell (l, m), m >= 1, adds its distance to
    the soft-min (temperature `lam`) of its predecessors: the diagonal (l-1, m-1) and the left (l, m-1)
    everywhere, plus the cell above (l-1, m) in the last column and, with `public_columns`, also in the
    first inner column (m = 1), as the public PyTorch code does. With `public_columns=False` the rules are
    the paper's, where only the two padding columns allow vertical moves (what tam_jax.alignment does).

    The soft-min is written with logsumexp, which stays finite where a sum of plain exponentials would
    underflow; the value is the same.

    Returns:
      `[B]`, the cost in the bottom-right cell.
    """
    padded = F.pad(dists, (1, 1))
    rows, cols = padded.shape[-2:]

    def soft_min(candidates):
        return -lam * torch.logsumexp(torch.stack(candidates) / -lam, dim=0)

    above = torch.cumsum(padded[:, 0], dim=-1)  # the finished previous row, [B, cols]
    for row in range(1, rows):
        costs = padded[:, row]
        cells = [torch.zeros_like(costs[:, 0])]
        for col in range(1, cols):
            candidates = [above[:, col - 1], cells[col - 1]]
            if col == cols - 1 or (public_columns and col == 1):
                candidates.append(above[:, col])
            cells.append(costs[:, col] + soft_min(candidates))
        above = torch.stack(cells, dim=-1)
    return above[:, -1]


def otam_distance(dists: torch.Tensor, lam: float = 0.1, bidirectional: bool = True,
                  public_columns: bool = True) -> torch.Tensor:
    """`[B, L, M]` -> `[B]`; with `bidirectional`, plus the same on the transposed matrices (public code)."""
    score = otam_cumulative_distance(dists, lam, public_columns)
    if bidirectional:
        score = score + otam_cumulative_distance(dists.transpose(-1, -2), lam, public_columns)
    return score


def episode_loss(features: torch.Tensor, labels: torch.Tensor, *, way: int, shot: int, lam: float,
                 bidirectional: bool) -> torch.Tensor:
    """Mean cross-entropy over the queries of a batch of episodes.

    Args:
      features: `[E, way*shot + Nq, T, D]`, support videos first (class-major), then the queries.
      labels: `[E, Nq]` int64.
    """
    features = features.float()
    support, query = features[:, : way * shot], features[:, way * shot :]
    support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    episodes, num_query, frames = query.shape[:3]
    dists = 1 - torch.einsum("eqld,esmd->eqslm", query, support)  # [E, Nq, way*shot, T, T]
    per_video = otam_distance(dists.reshape(-1, frames, frames), lam, bidirectional)
    class_distances = per_video.reshape(episodes, num_query, way, shot).mean(dim=-1)
    return F.cross_entropy(-class_distances.reshape(-1, way), labels.reshape(-1))


# ----------------------------------------------------------------------------------------------------
# Model and input.


def build_model(arch: str, device: torch.device) -> torch.nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Identity()
    return model.to(device, memory_format=torch.channels_last)


def to_images(frames: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` -> normalised float32 `[N, 3, H, W]`, channels_last (the permute keeps NHWC)."""
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device).view(1, 3, 1, 1)
    images = frames.permute(0, 3, 1, 2).float().div_(255)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


class Settings:
    """Shapes and options of one run (from the command line)."""

    def __init__(self, args: argparse.Namespace):
        self.__dict__.update(vars(args))
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = args.dtype == "bfloat16"
        self.videos_per_episode = args.way * (args.shot + args.queries)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def frames(self, videos: int) -> torch.Tensor:
        shape = (videos * self.num_frames, self.image_size, self.image_size, 3)
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)

    def labels(self, episodes: int) -> torch.Tensor:
        one = torch.arange(self.way, device=self.device).repeat_interleave(self.queries)
        return one.repeat(episodes, 1)


# ----------------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call, device: torch.device, steps: int, warmup: int) -> dict:
    """First call, warm-up, then per-call synchronised median and back-to-back mean, in seconds."""
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        call()
    synchronize(device)
    return {"first_call_s": first, "median_step_s": statistics.median(times),
            "pipelined_step_s": (time.perf_counter() - start) / steps}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def out_of_time(settings: Settings) -> bool:
    return settings.deadline_unix > 0 and time.time() > settings.deadline_unix


# ----------------------------------------------------------------------------------------------------
# The measurements.


def make_train_step(settings: Settings, model, episodes: int):
    videos = episodes * settings.videos_per_episode
    frames = settings.frames(videos)
    labels = settings.labels(episodes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def forward_loss(frames, labels):
        with settings.autocast():
            features = model(to_images(frames))
        features = features.reshape(episodes, settings.videos_per_episode, settings.num_frames, -1)
        return episode_loss(features, labels, way=settings.way, shot=settings.shot, lam=settings.lam,
                            bidirectional=settings.bidirectional)

    compute = torch.compile(forward_loss) if settings.compile else forward_loss
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = compute(frames, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    return step, losses


def bench_train(settings: Settings, model, episodes: int) -> dict:
    frames_per_step = episodes * settings.videos_per_episode * settings.num_frames
    row = {"framework": "torch", "mode": "train", "batch": episodes, "frames_per_step": frames_per_step}
    reset_peak(settings.device)
    step, losses = make_train_step(settings, model, episodes)
    row.update(measure(step, settings.device, settings.steps, settings.warmup))
    row["frames_per_s"] = frames_per_step / row["median_step_s"]
    row["pipelined_frames_per_s"] = frames_per_step / row["pipelined_step_s"]
    row["peak_bytes"] = peak_bytes(settings.device)
    row["loss"] = float(losses[-1])
    return row


def bench_embed(settings: Settings, model, videos: int) -> dict:
    frames = settings.frames(videos)
    frames_per_step = videos * settings.num_frames
    row = {"framework": "torch", "mode": "embed", "batch": videos, "frames_per_step": frames_per_step}
    reset_peak(settings.device)
    model.eval()

    def embed():
        with torch.inference_mode(), settings.autocast():
            return model(to_images(frames)).float().reshape(videos, settings.num_frames, -1)

    try:
        row.update(measure(embed, settings.device, settings.steps, settings.warmup))
    finally:
        model.train()
    row["frames_per_s"] = frames_per_step / row["median_step_s"]
    row["pipelined_frames_per_s"] = frames_per_step / row["pipelined_step_s"]
    row["peak_bytes"] = peak_bytes(settings.device)
    return row


def bench_parts(settings: Settings, model, episodes: int) -> dict:
    """Seconds per call of the step's parts alone at `episodes` episodes per step."""
    videos = episodes * settings.videos_per_episode
    frames = settings.frames(videos)
    labels = settings.labels(episodes)
    model.eval()
    with torch.no_grad():
        dim = model(to_images(frames[:1])).shape[-1]
    model.train()
    features = torch.randn(episodes, settings.videos_per_episode, settings.num_frames, dim,
                           device=settings.device, requires_grad=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def backbone():
        with settings.autocast():
            out = model(to_images(frames))
        out.float().sum().backward()

    def alignment():
        episode_loss(features, labels, way=settings.way, shot=settings.shot, lam=settings.lam,
                     bidirectional=settings.bidirectional).backward()

    parts = {"episodes": episodes}
    for name, call in (("backbone_fwd_bwd", backbone), ("alignment_loss_fwd_bwd", alignment),
                       ("optimizer_update", optimizer.step)):
        parts[name + "_s"] = measure(call, settings.device, settings.steps, settings.warmup)["median_step_s"]
    model.zero_grad(set_to_none=True)
    return parts


def versions(settings: Settings) -> dict:
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": str(settings.device),
            "torch_threads": torch.get_num_threads()}
    if settings.device.type == "cuda":
        meta["device_kind"] = torch.cuda.get_device_name(settings.device)
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
    else:
        meta["device_kind"] = platform.processor() or platform.machine()
    return meta


def run(settings: Settings) -> dict:
    torch.manual_seed(0)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.backends.cudnn.benchmark = True
    model = build_model(settings.arch, settings.device)
    result = {"meta": versions(settings), "arch": settings.arch, "compile": settings.compile,
              "rows": [], "parts": None}

    def attempt(what, fn, *args):
        """One measurement; an error (out of memory, say) is recorded and the others go on."""
        if out_of_time(settings):
            print(f"torch {what}: skipped, out of time", flush=True)
            return {"skipped": "time budget"}
        try:
            return fn(settings, model, *args)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            error = f"{type(e).__name__}: {str(e)[:300]}"
        # Out of the except block, the failed call's tensors are free to go.
        print(f"torch {what}: {error}", flush=True)
        model.train()
        model.zero_grad(set_to_none=True)
        gc.collect()
        reset_peak(settings.device)
        return {"error": error}

    for episodes in settings.episodes_per_step:
        row = attempt(f"train {episodes}", bench_train, episodes)
        result["rows"].append({"framework": "torch", "mode": "train", "batch": episodes, **row})
        print(f"torch train, {episodes} episodes/step: {row.get('frames_per_s', 0):,.0f} frames/s",
              flush=True)
    for videos in settings.embed_batch_size:
        row = attempt(f"embed {videos}", bench_embed, videos)
        result["rows"].append({"framework": "torch", "mode": "embed", "batch": videos, **row})
        print(f"torch embed, {videos} videos/call: {row.get('frames_per_s', 0):,.0f} frames/s", flush=True)
    if settings.parts:
        ran = [r["batch"] for r in result["rows"] if r["mode"] == "train" and "frames_per_s" in r]
        if ran:
            result["parts"] = attempt("parts", bench_parts, max(ran))
    return result


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="a torchvision.models constructor, e.g. resnet18")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--queries", type=int, default=5, help="queries per class")
    p.add_argument("--episodes_per_step", type=int_list, default=[1, 2, 4])
    p.add_argument("--embed_batch_size", type=int_list, default=[128], help="videos per call")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass and loss")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="time the step's parts alone at the largest episodes per step that ran")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default); 1 avoids OpenMP spinning on a busy CPU")
    p.add_argument("--deadline_unix", type=float, default=0.0, help="start nothing new after this time")
    p.add_argument("--json_out", default=None)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    result = run(Settings(args))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
