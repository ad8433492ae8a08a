"""Convert a torchvision ResNet state dict into a tam_jax backbone checkpoint.

    python -m tam_jax.tools.import_weights --src resnet50-11ad3fa6.pth --arch resnet50 --out DIR

The source is a torchvision `state_dict()` saved as `.pth`/`.pt` (read with torch, imported only
then) or as `.safetensors` (read with the safetensors package's numpy API; timm's
`resnet50.tv_in1k` uses the same keys). The classifier `fc.*` is dropped, BatchNorm's
`num_batches_tracked` counters are ignored, and every other key must match the architecture
exactly. `DIR` is then readable by `tam_jax.models.load_backbone` and can be named as a config's
`model.init_from`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from tam_jax.models.backbone_files import save_backbone
from tam_jax.models.resnet import ARCHS, abstract_variables, feature_dim

CLASSIFIER_KEYS = ("fc.weight", "fc.bias")  # the ImageNet head; backbones end at the pooling
_BN_COUNTER = "num_batches_tracked"
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MAX_KEYS_SHOWN = 20


# ---------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a `.pth`/`.pt`/`.bin` or `.safetensors` file as {torch key: numpy array}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".tar"):
        return _read_pth(path)
    raise ValueError(
        f"{path}: unknown weights format {path.suffix!r}; expected .pth, .pt, .bin or .safetensors."
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs the safetensors package: pip install safetensors"
        ) from e
    return _strip_module_prefix(dict(load_file(str(path))))


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only this path needs PyTorch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch: pip install torch (CPU build is enough), or convert "
            "the file to .safetensors elsewhere and pass that instead."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for pickles it refuses or cannot read
        raise ValueError(
            f"{path}: torch.load(weights_only=True) failed ({e}). Save the model's "
            "state_dict(), not the model object, and pass that file."
        ) from e
    state = _unwrap_checkpoint(obj, path)
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "pass a plain state_dict()."
            )
        if value.is_floating_point():
            value = value.detach().to(torch.float32)  # numpy has no bfloat16
        arrays[key] = value.detach().cpu().numpy()
    return _strip_module_prefix(arrays)


def _unwrap_checkpoint(obj: object, path: Path) -> Mapping:
    """The state dict inside `obj`: itself, or a training checkpoint's "state_dict"/"model"."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper]
    return obj


def _strip_module_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the "module." prefix that torch.nn.DataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Key and layout mapping


def torch_key(collection: str, flax_path: Sequence[str]) -> str:
    """torchvision key of one backbone variable, e.g. ("params", ("layer1_0", "conv1",
    "kernel")) -> "layer1.0.conv1.weight"."""
    *modules, leaf = flax_path
    parts = [_MODULE_TO_TORCH.get(m, re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", m)) for m in modules]
    return ".".join([*parts, _LEAF_TO_TORCH[(collection, leaf)]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # conv kernel HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return flax_shape


@functools.cache  # tracing the model takes a fraction of a second; error reports ask 4 times
def _flax_leaves(arch: str) -> tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]:
    """(collection, module path + leaf name, Flax shape) of every variable of `arch`."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(arch))[0]
    return tuple(
        (path[0].key, tuple(p.key for p in path[1:]), tuple(leaf.shape)) for path, leaf in flat
    )


def expected_torch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} that a torchvision `arch` state dict holds, without `fc.*` and
    `num_batches_tracked`."""
    return {torch_key(c, p): _torch_shape(s) for c, p, s in _flax_leaves(arch)}


def _optional_keys(arch: str, expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple | None]:
    """Keys that may be present and are then dropped, with their shape (None: any shape)."""
    optional: dict[str, tuple | None] = {
        k[: -len("running_mean")] + _BN_COUNTER: None
        for k in expected
        if k.endswith(".running_mean")
    }
    optional["fc.weight"] = (None, feature_dim(arch))  # (num_classes, D)
    optional["fc.bias"] = None
    return optional


def _fits(shape: tuple[int, ...], want: tuple | None) -> bool:
    if want is None:
        return True
    return len(shape) == len(want) and all(
        w is None or s == w for s, w in zip(shape, want, strict=True)
    )


def find_mismatches(state: Mapping[str, np.ndarray], arch: str) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, "key: got vs expected" shape mismatches) of `state`."""
    expected = expected_torch_shapes(arch)
    optional = _optional_keys(arch, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(
        k
        for k in set(state) - set(expected) - set(optional)
        # A counter follows its BatchNorm: report the BatchNorm's own keys, not the counter too.
        if not (k.endswith(_BN_COUNTER) and k[: -len(_BN_COUNTER)] + "running_mean" in state)
    )
    mismatched = []
    for key in sorted(set(state) & (set(expected) | set(optional))):
        want = expected.get(key, optional.get(key))
        if not _fits(tuple(np.shape(state[key])), want):
            mismatched.append(f"{key}: {tuple(np.shape(state[key]))} vs {want}")
    return missing, unexpected, mismatched


def guess_arch(state: Mapping[str, np.ndarray]) -> str | None:
    """The architecture whose keys and shapes `state` fits exactly, if any."""
    for arch in ARCHS:
        if not any(find_mismatches(state, arch)):
            return arch
    return None


def _shown(keys: list[str]) -> str:
    if len(keys) <= _MAX_KEYS_SHOWN:
        return ", ".join(keys)
    return ", ".join(keys[:_MAX_KEYS_SHOWN]) + f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)"


def convert_state_dict(
    state: Mapping[str, np.ndarray], arch: str, *, source: str = "state dict"
) -> dict:
    """torchvision state dict -> float32 backbone variables {"params", "batch_stats"} of `arch`.

    Raises a ValueError naming the missing, unexpected and mis-shaped keys (and the architecture
    the keys do fit, when there is one) unless `state` matches `arch` exactly.
    """
    missing, unexpected, mismatched = find_mismatches(state, arch)
    if missing or unexpected or mismatched:
        problems = [f"{source} does not match a torchvision {arch}."]
        guess = guess_arch(state)
        if guess is not None and guess != arch:
            problems.append(f"Its keys fit {guess}: pass --arch {guess}.")
        if missing:
            problems.append(f"Missing keys: {_shown(missing)}.")
        if unexpected:
            problems.append(f"Unexpected keys: {_shown(unexpected)}.")
        if mismatched:
            problems.append(f"Shape mismatches (file vs {arch}): {_shown(mismatched)}.")
        raise ValueError(" ".join(problems))

    variables: dict = {}
    for collection, path, _ in _flax_leaves(arch):
        value = np.asarray(state[torch_key(collection, path)], np.float32)
        if value.ndim == 4:  # OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return variables


# ---------------------------------------------------------------------------------------------
# Command


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_weights(src: str | Path, arch: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Convert the torchvision weights file `src` of `arch` into the backbone checkpoint `out`.

    Returns the absolute output directory; raises ValueError/FileNotFoundError/ImportError with
    what to do.
    """
    src = Path(src).expanduser().resolve()
    state = read_state_dict(src)
    variables = convert_state_dict(state, arch, source=str(src))
    metadata = {
        "source": str(src),
        "source_sha256": _sha256(src),
        "dropped_keys": sorted(k for k in state if k in CLASSIFIER_KEYS),
        "converted_by": "tam_jax.tools.import_weights",
    }
    return save_backbone(out, arch, variables, metadata=metadata, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tam_jax.tools.import_weights",
        description="Convert torchvision ResNet weights (.pth or .safetensors) into a tam_jax "
        "backbone checkpoint for tam_jax.models.load_backbone / config.model.init_from.",
    )
    parser.add_argument("--src", required=True, help="torchvision state dict, .pth or .safetensors")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="architecture of src")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = import_weights(args.src, args.arch, args.out, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as e:
        print(f"import_weights: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.arch} backbone (D={feature_dim(args.arch)}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
