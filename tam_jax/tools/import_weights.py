"""Convert a torchvision ResNet state dict into a tam_jax backbone checkpoint.

    python -m tam_jax.tools.import_weights --src resnet50-11ad3fa6.pth --arch resnet50 --out DIR
    python -m tam_jax.tools.import_weights --src checkpoint.pth --arch resnet50 --out DIR [--prefix backbone.]

The source is a `.pth`/`.pt` file (read with torch, imported only then) or a `.safetensors` file (read
with the safetensors package's numpy API; timm's `resnet50.tv_in1k` uses torchvision's keys). It may be:

- a torchvision `state_dict()`, or a training checkpoint holding one under `model_state_dict`,
  `state_dict`, `model`, `net` or `backbone` (its other entries, such as `iteration` or
  `optimizer_state_dict`, are ignored); a `module.` prefix (DataParallel) on every key is dropped;
- the state dict of a larger model whose ResNet sits under a prefix (`backbone.`, `resnet.`,
  `encoder.`, `base_model.`, `module.backbone.`, ...): found when it is the only prefix that holds a
  ResNet (a `conv1.weight` beside `layer1.*`, or `0.weight` beside `4.*`); when several do (`student.`
  and `teacher.`, `encoder_q.` and `encoder_k.`) the tool stops and asks for `--prefix`; the keys
  outside it are ignored;
- a ResNet kept as `nn.Sequential(*list(resnet.children())[:-1])` (or `[:-2]`), as the public few-shot
  action recognition code keeps it: keys `0.weight` (conv1), `1.*` (bn1), `4.N.*` .. `7.N.*`
  (layer1..layer4), at the top or under a prefix.

Within the backbone the classifier `fc.*` is dropped, BatchNorm's `num_batches_tracked` counters are
ignored, and every other key must match the architecture exactly (an error names the keys at fault).
`DIR` is then readable by `tam_jax.models.load_backbone` and can be named as a config's `model.init_from`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from tam_jax import errors, log_setup
from tam_jax.errors import UserError
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
_log = logging.getLogger(__spec__.name if __spec__ else __name__)  # not "__main__" under python -m


# ---------------------------------------------------------------------------------------------
# Reading files


class WeightsFileError(UserError, ValueError):
    """A `--src` that is not a weights file this tool reads, or that holds ResNets under several prefixes
    (`--prefix` chooses); names the file."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a `.pth`/`.pt`/`.bin` or `.safetensors` file as {torch key: numpy array}."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsFileError(f"weights file {path} is a directory; give the weights file inside it "
                               "(.pth, .pt, .bin or .safetensors).")
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
    try:
        arrays = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on a bad header
        raise WeightsFileError(f"not a safetensors file: {path} ({e}).") from None
    return _strip_module_prefix(dict(arrays))


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
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor. The file holds "
                f"{_describe_entries(obj)}; weights are read from a plain state_dict() or from one "
                f"under {', '.join(WRAPPER_KEYS)}: save the model's state_dict() under one of these."
            )
        if value.is_floating_point():
            value = value.detach().to(torch.float32)  # numpy has no bfloat16
        arrays[key] = value.detach().cpu().numpy()
    return _strip_module_prefix(arrays)


WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "net", "backbone")


def _unwrap_checkpoint(obj: object, path: Path) -> Mapping:
    """The state dict inside `obj`: the first entry of `WRAPPER_KEYS` that is a mapping (again, for a
    wrapper inside a wrapper), else `obj` itself. The wrapper's siblings are ignored."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    for _ in range(len(WRAPPER_KEYS)):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _describe_entries(obj: Mapping) -> str:
    """ "iteration (int), model_state (dict of 120)": what a checkpoint's top level holds."""
    shown = [
        f"{k} ({type(v).__name__}{f' of {len(v)}' if isinstance(v, Mapping) else ''})"
        for k, v in list(obj.items())[:8]
    ]
    return ", ".join(shown) + (", ..." if len(obj) > 8 else "")


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
# Finding the backbone in a larger state dict

# nn.Sequential(*list(resnet.children())[:-1]) numbers torchvision's children: conv1, bn1, relu,
# maxpool, layer1..layer4, avgpool, fc.
_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4",
                     "9": "fc"}
_ANCHORS = {"torchvision": ("conv1.weight", "layer1."), "sequential": ("0.weight", "4.")}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A ResNet found in a state dict: the `prefix` of its keys ("" at the top), their `layout`
    ("torchvision" or "sequential"), and its arrays under torchvision key names (`state`)."""

    prefix: str
    layout: str
    state: dict[str, np.ndarray]


def under_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def sequential_to_torchvision(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys of `nn.Sequential(*list(resnet.children())[:-1])` -> torchvision's: ``0.weight`` ->
    ``conv1.weight``, ``1.running_mean`` -> ``bn1.running_mean``, ``4.0.conv1.weight`` ->
    ``layer1.0.conv1.weight``. Other keys are kept (and then reported as unexpected)."""
    renamed = {}
    for key, value in state.items():
        head, dot, rest = key.partition(".")
        renamed[_SEQUENTIAL_NAMES.get(head, head) + dot + rest] = value
    return renamed


def backbone_candidates(state: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """(prefix, layout) of every place that looks like the start of a ResNet: a ``conv1.weight`` with a
    ``layer1.*`` beside it (torchvision) or a ``0.weight`` with a ``4.*`` (sequential)."""
    found = set()
    for key in state:
        for layout, (anchor, sibling) in _ANCHORS.items():
            if key == anchor or key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                if any(k.startswith(prefix + sibling) for k in state):
                    found.add((prefix, layout))
    return sorted(found)


def extract_backbone(state: Mapping[str, np.ndarray], prefix: str, layout: str | None = None) -> Backbone:
    """The keys under `prefix` as a torchvision-keyed `Backbone` (layout detected when not given)."""
    sub = under_prefix(state, prefix)
    if layout is None:
        layout = "sequential" if "0.weight" in sub and "conv1.weight" not in sub else "torchvision"
    return Backbone(prefix, layout, sequential_to_torchvision(sub) if layout == "sequential" else sub)


def select_backbone(
    state: Mapping[str, np.ndarray], *, prefix: str | None = None, source: str = "state dict"
) -> Backbone:
    """The ResNet inside `state`: under `prefix` ("" = the top; "backbone" or "backbone."), else under the
    one prefix of `backbone_candidates` (the top when there is none). `convert_state_dict` then checks its
    keys against the architecture.

    Raises WeightsFileError when `prefix` selects no key, or when ResNets sit under several prefixes
    (naming them: the caller chooses with --prefix; nothing is guessed).
    """
    prefixes = sorted({p for p, _ in backbone_candidates(state)})
    shown = ", ".join(repr(p) for p in prefixes)
    if prefix is not None:
        prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if prefix and not any(k.startswith(prefix) for k in state) and prefix.startswith("module."):
            prefix = prefix[len("module.") :]  # read_state_dict dropped DataParallel's prefix
        if prefix and not any(k.startswith(prefix) for k in state):
            raise WeightsFileError(
                f"No key of {source} starts with {prefix!r} (ResNets under: {shown or 'none'})."
            )
        return extract_backbone(state, prefix)
    if len(prefixes) > 1:
        raise WeightsFileError(f"{source} holds a ResNet under each of the key prefixes {shown}: "
                               "pass --prefix=<one of them>.")
    return extract_backbone(state, prefixes[0] if prefixes else "")


# ---------------------------------------------------------------------------------------------
# Command


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_weights(
    src: str | Path, arch: str, out: str | Path, *, prefix: str | None = None, overwrite: bool = False
) -> Path:
    """Convert the ResNet `arch` in the weights file `src` (see the module docstring for the forms
    read; `prefix` as in `select_backbone`) into the backbone checkpoint `out`.

    Returns the absolute output directory; raises ValueError/FileNotFoundError/ImportError with
    what to do.
    """
    src = Path(src).expanduser().resolve()
    state = read_state_dict(src)
    backbone = select_backbone(state, prefix=prefix, source=str(src))
    where = f" (keys under '{backbone.prefix}')" if backbone.prefix else ""
    where += ", nn.Sequential layout" if backbone.layout == "sequential" else ""
    variables = convert_state_dict(backbone.state, arch, source=f"{src}{where}")
    metadata = {
        "source": str(src),
        "source_sha256": _sha256(src),
        "prefix": backbone.prefix,
        "layout": backbone.layout,
        "dropped_keys": sorted(k for k in backbone.state if k in CLASSIFIER_KEYS),
        "ignored_keys": len(state) - len(backbone.state),
        "converted_by": "tam_jax.tools.import_weights",
    }
    return save_backbone(out, arch, variables, metadata=metadata, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tam_jax.tools.import_weights",
        description="Convert torchvision ResNet weights (.pth or .safetensors; a state dict, a training "
        "checkpoint, a larger model holding a ResNet, or an nn.Sequential ResNet) into a tam_jax backbone "
        "checkpoint for tam_jax.models.load_backbone / config.model.init_from.",
    )
    parser.add_argument("--src", required=True, help="weights file, .pth or .safetensors")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="architecture of src")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--prefix",
        help="key prefix of the ResNet inside a larger model, e.g. backbone. ('' = the top level); default: "
        "the only prefix holding a ResNet (several: an error naming them)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    log_setup.setup()  # the line below on stderr; Orbax's INFO about the save dropped

    def body() -> int:
        out = import_weights(args.src, args.arch, args.out, prefix=args.prefix, overwrite=args.overwrite)
        _log.info("wrote %s backbone (D=%d) to %s", args.arch, feature_dim(args.arch), out)
        return 0

    return errors.run_command(body, user_errors=(ValueError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
