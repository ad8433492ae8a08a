"""torchvision weight import: key mapping, error reporting, and the test of record against
torchvision's own ResNets (needs torch and torchvision, skipped without them)."""

import functools
import json
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
    create_backbone,
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    assert "resnet18" in done.stderr  # "wrote resnet18 backbone ...", logged

    backbone, variables = load_backbone(out)
    assert backbone.arch == "resnet18"
    jax.tree.map(np.testing.assert_array_equal, variables, iw.convert_state_dict(state, "resnet18"))
    # A second run refuses to overwrite, with a non-zero exit status.
    assert iw.main(cmd[3:]) == 1
    assert "overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Checkpoints as training code saves them: wrappers, a ResNet inside a larger model, nn.Sequential


@functools.cache
def _features_fn(arch):
    """Jitted eval-mode backbone features, compiled once per arch and input shape for all forms."""
    backbone = create_backbone(arch)
    return jax.jit(lambda v, x: backbone.apply(v, x, train=False))


def _torch_features(module, images):
    """float32 [B, D] of a torch module (a ResNet without fc, or an nn.Sequential ending in avgpool)."""
    import torch

    with torch.no_grad():
        out = module.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return out.reshape(len(images), -1).numpy()


def _check_import(src, want_module, tmp_path, arch="resnet18", prefix=None):
    """Imports `src` and checks our features against `want_module`'s on random 64x64 frames to 1e-4;
    returns the written metadata."""
    out = iw.import_weights(src, arch, tmp_path / "out", prefix=prefix, overwrite=True)
    _, variables = load_backbone(out)
    frames = np.random.default_rng(3).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    images = np.asarray(normalize_imagenet(frames))
    with jax.default_matmul_precision("highest"):
        got = _features_fn(arch)(variables, images)
    assert _relative_error(got, _torch_features(want_module, images)) < 1e-4
    return json.loads((out / "backbone.json").read_text())


def _resnet_without_fc(seed=0):
    model = _torchvision_reference("resnet18", seed)
    import torch

    model.fc = torch.nn.Identity()
    return model


@pytest.mark.parametrize("wrapper", ["model_state_dict", "state_dict", "model", "net", "backbone"])
def test_training_checkpoints_are_unwrapped_and_their_other_entries_ignored(wrapper, tmp_path):
    torch = pytest.importorskip("torch")
    model = _torchvision_reference("resnet18", seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()  # a real optimizer state, with tensors, beside the weights
    src = tmp_path / "checkpoint.pth"
    torch.save(
        {"iteration": 1200, wrapper: model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
         "args": {"lr": 0.1, "dataset": "ssv2"}},
        src,
    )
    model.fc = torch.nn.Identity()
    _check_import(src, model, tmp_path)


class _Larger:
    """Torch models that hold a ResNet-18 the way training code does (built on first use: torch is
    optional)."""

    @staticmethod
    def build(attribute, sequential=False, seed=0):
        import torch

        resnet = _resnet_without_fc(seed)
        if sequential:
            resnet = torch.nn.Sequential(*list(_torchvision_reference("resnet18", seed).children())[:-1])
        model = torch.nn.Module()
        setattr(model, attribute, resnet)
        model.head = torch.nn.Linear(512, 5)
        model.register_buffer("proto_scale", torch.ones(1))
        return model, resnet


@pytest.mark.parametrize("attribute", ["backbone", "resnet", "encoder", "base_model"])
def test_a_resnet_inside_a_larger_model_is_found_by_its_prefix(attribute, tmp_path):
    torch = pytest.importorskip("torch")
    model, resnet = _Larger.build(attribute)
    src = tmp_path / "model.pth"
    torch.save({"epoch": 30, "state_dict": model.state_dict()}, src)
    metadata = _check_import(src, resnet, tmp_path)
    assert (metadata["prefix"], metadata["layout"]) == (f"{attribute}.", "torchvision")
    assert metadata["ignored_keys"] == 3  # head.weight, head.bias, proto_scale


def test_data_parallel_prefix_and_an_explicit_prefix(tmp_path):
    torch = pytest.importorskip("torch")
    model, resnet = _Larger.build("backbone")
    src = tmp_path / "dp.pth"
    torch.save(torch.nn.DataParallel(model).state_dict(), src)  # every key: module.backbone.*
    assert _check_import(src, resnet, tmp_path)["prefix"] == "backbone."
    assert _check_import(src, resnet, tmp_path, prefix="module.backbone")["prefix"] == "backbone."
    # Not every key under module.: the prefix is kept and still found.
    mixed = {**{f"module.backbone.{k}": v.numpy() for k, v in resnet.state_dict().items()},
             "queue": np.zeros((4, 8), np.float32)}
    assert ("module.backbone.", "torchvision") in iw.backbone_candidates(mixed)
    backbone = iw.select_backbone(mixed)
    assert backbone.prefix == "module.backbone." and "conv1.weight" in backbone.state


@pytest.mark.parametrize("children", ["[:-1]", "[:-2]", "resnet.[:-1]"])
def test_the_sequential_resnet_of_the_few_shot_codebases(children, tmp_path):
    torch = pytest.importorskip("torch")
    reference = _torchvision_reference("resnet18", seed=2)
    stop = -2 if children.endswith("[:-2]") else -1
    sequential = torch.nn.Sequential(*list(reference.children())[:stop])
    if children.startswith("resnet."):  # self.resnet = nn.Sequential(...) beside a head
        model, sequential = _Larger.build("resnet", sequential=True, seed=2)
        state = model.state_dict()
    else:
        state = sequential.state_dict()
    assert "0.weight" in {k.removeprefix("resnet.") for k in state}
    src = tmp_path / "sequential.pth"
    torch.save({"model_state_dict": state, "iteration": 5}, src)
    if stop == -2:  # No average pooling: torch's output is [B, 512, 2, 2]; pool it as torchvision does.
        sequential = torch.nn.Sequential(sequential, torch.nn.AdaptiveAvgPool2d(1))
    metadata = _check_import(src, sequential, tmp_path)
    assert metadata["layout"] == "sequential"
    assert metadata["prefix"] == ("resnet." if children.startswith("resnet.") else "")


def test_two_complete_resnets_need_a_prefix(tmp_path):
    """A MoCo-style checkpoint: query and key encoders are both complete ResNet-18s."""
    torch = pytest.importorskip("torch")
    query, key = _resnet_without_fc(seed=4), _resnet_without_fc(seed=5)
    model = torch.nn.Module()
    model.encoder_q, model.encoder_k = query, key
    src = tmp_path / "moco.pth"
    torch.save({"state_dict": torch.nn.DataParallel(model).state_dict(), "epoch": 200}, src)
    with pytest.raises(iw.WeightsFileError, match=r"pass --prefix=<one of them>") as info:
        iw.import_weights(src, "resnet18", tmp_path / "x")
    assert "'encoder_k.', 'encoder_q.'" in str(info.value)
    args = ["--src", str(src), "--arch", "resnet18", "--out", str(tmp_path / "out"), "--prefix",
            "module.encoder_q."]
    assert iw.main(args) == 0
    assert _check_import(src, query, tmp_path, prefix="encoder_q.")["prefix"] == "encoder_q."


def test_resnets_under_two_prefixes_are_an_error_naming_both_until_one_is_passed(tmp_path, capsys):
    """A distillation checkpoint: a ResNet-18 student and a ResNet-34 teacher; nothing is guessed."""
    student = _random_state("resnet18", classifier=False)
    state = {
        **{f"student.{k}": v for k, v in student.items()},
        **{f"teacher.{k}": v for k, v in _random_state("resnet34", classifier=False).items()},
        "head.weight": np.zeros((5, 512), np.float32),
    }
    src = tmp_path / "kd.safetensors"
    save_file(state, str(src))
    args = ["--src", str(src), "--arch", "resnet18", "--out", str(tmp_path / "out")]
    assert iw.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "under each of the key prefixes 'student.', 'teacher.': pass --prefix=<one of them>." in err
    assert iw.main([*args, "--prefix=student."]) == 0
    _, variables = load_backbone(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, variables, iw.convert_state_dict(student, "resnet18"))
    # The prefix that fits another architecture, chosen: the usual strict error naming keys and arch.
    with pytest.raises(ValueError, match="pass --arch resnet34"):
        iw.convert_state_dict(iw.select_backbone(state, prefix="teacher").state, "resnet18")
    with pytest.raises(iw.WeightsFileError, match=r"'nope.' \(ResNets under: 'student.', 'teacher.'\)"):
        iw.select_backbone(state, prefix="nope")
    # No ResNet anywhere: the top level is read, and the strict error names the keys.
    with pytest.raises(ValueError, match=r"Missing keys: .*conv1\.weight.*Unexpected keys: head\.weight"):
        iw.convert_state_dict(iw.select_backbone({"head.weight": state["head.weight"]}).state, "resnet18")


def test_a_checkpoint_without_a_known_wrapper_names_what_it_holds(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "odd.pth"
    torch.save({"iteration": 3, "weights": _resnet_without_fc().state_dict()}, src)
    holds = r"entry 'iteration' is a int.*weights \(OrderedDict of \d+\)"
    with pytest.raises(ValueError, match=holds) as info:
        iw.read_state_dict(src)
    assert "model_state_dict, state_dict, model, net, backbone" in str(info.value)
