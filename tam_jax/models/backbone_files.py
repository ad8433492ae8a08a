"""Backbone files on disk: a directory holding the variables and what built them.

    DIR/backbone.json   {"format": "tam_jax.backbone", "format_version": 1, "arch": ...,
                         "feature_dim": ..., plus free-form provenance such as "source"}
    DIR/variables/      orbax StandardCheckpointer tree {"params": ..., "batch_stats": ...}

`save_backbone` writes one (`tam_jax.tools.import_weights` uses it for converted torchvision
weights) and `load_backbone` rebuilds the module and restores its variables, which is what
`config.model.init_from` points at.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tam_jax.errors import DataError
from tam_jax.models.resnet import ResNet, abstract_variables, create_backbone, feature_dim

FORMAT = "tam_jax.backbone"
FORMAT_VERSION = 1
METADATA_FILE = "backbone.json"
VARIABLES_DIR = "variables"


def _shape_tree(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_variables(arch: str, variables: dict, where: str) -> None:
    """Raise a ValueError naming every missing, extra or mis-shaped entry of `variables`."""
    want, got = _shape_tree(abstract_variables(arch)), _shape_tree(variables)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    mismatched = [f"{k}: {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if missing or extra or mismatched:
        raise DataError(
            f"{where}: variables do not fit a {arch} backbone. Missing: {missing}; "
            f"unexpected: {extra}; shape mismatches (got != expected): {mismatched}."
        )


def save_backbone(
    out_dir: str | Path,
    arch: str,
    variables: dict,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `variables` of an `arch` backbone to `out_dir` (see the module docstring).

    `metadata` adds provenance entries to backbone.json. Writing over an existing checkpoint needs
    `overwrite`; any other non-empty `out_dir` is refused. Returns the absolute directory.
    """
    import orbax.checkpoint as ocp  # slow to import; only needed here

    out = Path(out_dir).expanduser().resolve()
    check_variables(arch, variables, str(out))
    if out.exists() and any(out.iterdir()):
        if not (out / METADATA_FILE).is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no {METADATA_FILE}; refusing to write a backbone "
                "checkpoint into it. Choose a new or empty directory."
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a backbone checkpoint; pass overwrite=True "
                "(--overwrite on the command line) or choose another directory."
            )
        # Metadata first: a directory without it is never mistaken for a complete checkpoint.
        (out / METADATA_FILE).unlink()
        shutil.rmtree(out / VARIABLES_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    info = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "feature_dim": feature_dim(arch),
    }
    (out / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def read_backbone_metadata(path: str | Path) -> dict:
    """The parsed backbone.json of the checkpoint directory `path`, checked for format."""
    meta_file = Path(path).expanduser() / METADATA_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file} not found: {path} is not a backbone checkpoint. Create one with "
            "`python -m tam_jax.tools.import_weights --src FILE --arch ARCH --out DIR`."
        )
    info = json.loads(meta_file.read_text())
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_file}: format {info.get('format')!r} version {info.get('format_version')!r} "
            f"is not {FORMAT!r} version {FORMAT_VERSION}."
        )
    return info


def load_backbone(
    path: str | Path, *, dtype: Any = jnp.float32, freeze_bn: bool = False
) -> tuple[ResNet, dict]:
    """Restore a backbone checkpoint directory as `(model, variables)`.

    `model.apply(variables, images, train=False)` maps normalised `[B, H, W, 3]` float images to
    `[B, D]` float32 features. `dtype` and `freeze_bn` configure the returned module; the
    variables are float32 whatever `dtype` is.
    """
    import orbax.checkpoint as ocp  # slow to import; only needed here

    root = Path(path).expanduser().resolve()
    info = read_backbone_metadata(root)
    arch = info["arch"]
    target = abstract_variables(arch)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(root / VARIABLES_DIR)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        check_variables(arch, stored_tree, str(root / VARIABLES_DIR))
        variables = checkpointer.restore(root / VARIABLES_DIR, target)
    variables = jax.tree.map(jnp.asarray, variables)
    return create_backbone(arch, dtype=dtype, freeze_bn=freeze_bn), variables
