"""torchvision weight import: key mapping, error reporting, and the test of record against
torchvision's own ResNets (needs torch and torchvision, skipped without them)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tam_jax.models import (
    FrameEmbedder,
    embedder_variables_from_backbone,
    load_backbone,
    normalize_imagenet,
)
from tam_jax.tools import import_weights as iw

REPO = Path(__file__).resolve().parents[1]


def _random_state(arch, seed=0, counters=True, classifier=True):
    """A torchvision-keyed state dict of `arch` with random values (no torch needed)."""
    rng = np.random.default_rng(seed)
    state = {
        k: rng.normal(size=s).astype(np.float32) for k, s in iw.expected_torch_shapes(arch).items()
    }
    if counters:
        for k in [k for k in state if k.endswith(".running_mean")]:
            state[k.replace("running_mean", "num_batches_tracked")] = np.array(7, np.int64)
    if classifier:
        state["fc.weight"] = np.zeros((10, iw.feature_dim(arch)), np.float32)
        state["fc.bias"] = np.zeros((10,), np.float32)
    return state


def _relative_error(got, want):
    """max|got - want| / max|want|: the error measure of the test of record."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


# ---------------------------------------------------------------------------------------------
# Mapping and errors, without torch


def test_torch_key_names():
    assert iw.torch_key("params", ("conv1", "kernel")) == "conv1.weight"
    assert iw.torch_key("params", ("layer3_5", "bn2", "scale")) == "layer3.5.bn2.weight"
    assert iw.torch_key("params", ("layer1_0", "downsample_conv", "kernel")) == (
        "layer1.0.downsample.0.weight"
    )
    assert iw.torch_key("batch_stats", ("layer4_0", "downsample_bn", "var")) == (
        "layer4.0.downsample.1.running_var"
    )


def test_conversion_transposes_kernels_and_renames_statistics():
    state = _random_state("resnet18")
    variables = iw.convert_state_dict(state, "resnet18")
    kernel = variables["params"]["layer2_0"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 64, 128)  # HWIO from torch's OIHW (128, 64, 3, 3)
    assert kernel[2, 0, 5, 7] == state["layer2.0.conv1.weight"][7, 5, 2, 0]
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"],
        state["layer2.0.downsample.1.running_var"],
    )
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], state["bn1.weight"])


def test_counters_and_classifier_are_optional():
    with_all = iw.convert_state_dict(_random_state("resnet18"), "resnet18")
    bare = iw.convert_state_dict(
        _random_state("resnet18", counters=False, classifier=False), "resnet18"
    )
    jax.tree.map(np.testing.assert_array_equal, with_all, bare)


def test_missing_key_is_named():
    state = _random_state("resnet18")
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"Missing keys: layer3\.1\.bn2\.running_var"):
        iw.convert_state_dict(state, "resnet18")


def test_unexpected_key_is_named():
    state = _random_state("resnet18")
    state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"Unexpected keys: layer5\.0\.conv1\.weight"):
        iw.convert_state_dict(state, "resnet18")


def test_shape_mismatch_is_named():
    state = _random_state("resnet18")
    state["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"layer2\.0\.conv1\.weight: \(128, 64, 1, 1\) vs \(128, 64, 3, 3\)"
    ):
        iw.convert_state_dict(state, "resnet18")


@pytest.mark.parametrize(
    ("actual", "claimed", "named_key"),
    [
        ("resnet50", "resnet18", "layer1.0.conv3.weight"),  # unexpected Bottleneck keys
        ("resnet18", "resnet34", "layer1.2.conv1.weight"),  # missing blocks
        ("resnet34", "resnet18", "layer2.2.conv1.weight"),  # unexpected blocks
    ],
)
def test_wrong_architecture_names_keys_and_the_right_arch(actual, claimed, named_key):
    with pytest.raises(ValueError, match="pass --arch " + actual) as info:
        iw.convert_state_dict(_random_state(actual), claimed)
    assert named_key in str(info.value)
    assert f"does not match a torchvision {claimed}" in str(info.value)
    assert "num_batches_tracked" not in str(info.value)


def test_classifier_of_another_width_is_a_mismatch():
    state = _random_state("resnet18")
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError, match=r"fc\.weight: \(1000, 2048\)"):
        iw.convert_state_dict(state, "resnet18")


def test_safetensors_round_trip_and_module_prefix(tmp_path):
    state = _random_state("tiny", counters=False)
    src = tmp_path / "tiny.safetensors"
    save_file({"module." + k: v for k, v in state.items()}, str(src))  # as DataParallel saves
    read = iw.read_state_dict(src)
    assert set(read) == set(state)
    out = iw.import_weights(src, "tiny", tmp_path / "out")
    _, variables = load_backbone(out)
    jax.tree.map(np.testing.assert_array_equal, variables, iw.convert_state_dict(state, "tiny"))


def test_pth_without_torch_says_to_install_it(tmp_path, monkeypatch):
    src = tmp_path / "w.pth"
    src.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        iw.read_state_dict(src)


def test_unreadable_sources_are_explained(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        iw.read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.npz"):
        iw.read_state_dict(tmp_path / "w.npz")
    code = iw.main(["--src", str(tmp_path / "nope.pth"), "--arch", "resnet18", "--out", "x"])
    assert code == 1
    assert "nope.pth" in capsys.readouterr().err


def test_package_does_not_import_torch():
    code = (
        "import sys, tam_jax.models, tam_jax.tools.import_weights; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


# ---------------------------------------------------------------------------------------------
# Test of record: torchvision's own networks


def _torchvision_reference(arch, seed):
    """torchvision `arch` with random weights and random BatchNorm statistics, eval mode."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.mark.parametrize(
    ("arch", "shape"), [("resnet18", (2, 112, 112)), ("resnet50", (1, 224, 224))]
)
def test_torchvision_features_are_reproduced(arch, shape, tmp_path):
    torch = pytest.importorskip("torch")
    model = _torchvision_reference(arch, seed=0)
    state = model.state_dict()  # includes fc.* and num_batches_tracked
    pth = tmp_path / f"{arch}.pth"
    torch.save(state, pth)
    # The .safetensors copy, as timm ships it, without the counters.
    st = tmp_path / f"{arch}.safetensors"
    save_file(
        {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(st)
    )

    want_keys = {k for k in state if not k.startswith("fc.") and "num_batches" not in k}
    assert set(iw.expected_torch_shapes(arch)) == want_keys

    _, from_pth = load_backbone(iw.import_weights(pth, arch, tmp_path / "from_pth"))
    backbone, variables = load_backbone(iw.import_weights(st, arch, tmp_path / "from_st"))
    jax.tree.map(np.testing.assert_array_equal, from_pth, variables)

    frames = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    images = np.asarray(normalize_imagenet(frames))  # [B, H, W, 3] float32
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        want = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.default_matmul_precision("highest"):  # no TF32 shortcuts when run on a GPU
        got = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(variables, images)
    assert got.shape == want.shape == (shape[0], iw.feature_dim(arch))
    assert got.dtype == jnp.float32
    assert _relative_error(got, want) < 1e-4

    if arch == "resnet18":  # the embedder reproduces torchvision on raw frames, too
        embedder = FrameEmbedder(arch=arch)
        with jax.default_matmul_precision("highest"):
            per_frame = jax.jit(lambda v, f: embedder.apply(v, f, train=False))(
                embedder_variables_from_backbone(variables), frames[None]
            )
        assert _relative_error(per_frame[0], want) < 1e-4


def test_command_line(tmp_path, capsys):
    state = _random_state("resnet18", seed=2)
    src = tmp_path / "resnet18.safetensors"
    save_file(state, str(src))
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "tam_jax.tools.import_weights",
        "--src",
        str(src),
        "--arch",
        "resnet18",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resnet18" in done.stdout

    backbone, variables = load_backbone(out)
    assert backbone.arch == "resnet18"
    jax.tree.map(np.testing.assert_array_equal, variables, iw.convert_state_dict(state, "resnet18"))
    # A second run refuses to overwrite, with a non-zero exit status.
    assert iw.main(cmd[3:]) == 1
    assert "overwrite" in capsys.readouterr().err
