"""Backbones, the frame embedder and backbone checkpoints (no PyTorch needed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax.models import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameEmbedder,
    create_backbone,
    embedder_variables_from_backbone,
    feature_dim,
    load_backbone,
    normalize_imagenet,
    read_backbone_metadata,
    save_backbone,
)
from tam_jax.models.resnet import abstract_variables


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _jit_apply(model, train=False, **kwargs):
    """`model.apply(variables, x, train=train, **kwargs)`, jitted: eager Flax is slow on CPU."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=train, **kwargs))


def _random_variables(arch, seed=0):
    """Random float32 backbone variables, drawn with numpy (jitting `init` costs seconds).

    BatchNorm statistics are non-trivial so that tests see whether they are used, kept or updated.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":  # HWIO; He-normal over fan-in keeps activations O(1)
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:3])), leaf.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0, 0.2, leaf.shape)  # bias, mean

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(arch))
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("tiny"), _random_variables("tiny")


@pytest.mark.parametrize(
    ("arch", "dim"), [("tiny", 128), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]
)
def test_output_shape_and_feature_dim(arch, dim):
    model = create_backbone(arch)
    init = lambda x: model.init(jax.random.key(0), x, train=False)
    variables = jax.eval_shape(init, _images((3, 64, 64, 3)))
    assert set(variables) == {"params", "batch_stats"}
    out = jax.eval_shape(lambda v: model.apply(v, _images((3, 64, 64, 3)), train=False), variables)
    assert feature_dim(arch) == dim
    assert out.shape == (3, dim)
    assert out.dtype == jnp.float32


def test_parameter_counts_match_torchvision_without_fc():
    # torchvision's resnet18 / resnet50 have 11,689,512 / 25,557,032 parameters including fc.
    counts = {}
    for arch in ("resnet18", "resnet50"):
        variables = abstract_variables(arch)
        counts[arch] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    assert counts["resnet18"] == 11_689_512 - (512 * 1000 + 1000)
    assert counts["resnet50"] == 25_557_032 - (2048 * 1000 + 1000)


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="resnet101.*resnet50"):
        create_backbone("resnet101")
    with pytest.raises(ValueError, match="tiny"):
        feature_dim("vgg16")
    assert set(ARCHS) == {"tiny", "resnet18", "resnet34", "resnet50"}


def test_eval_mode_uses_running_statistics(tiny):
    model, variables = tiny
    x = _images((2, 32, 32, 3))
    apply = _jit_apply(model)
    single, pair = apply(variables, x[:1]), apply(variables, x)
    # With running statistics, an image's features do not depend on the rest of the batch.
    np.testing.assert_allclose(single[0], pair[0], rtol=1e-5, atol=1e-5)
    assert pair.shape == (2, 128)


def test_train_mode_updates_statistics_with_torch_momentum(tiny):
    model, variables = tiny
    x = _images((4, 32, 32, 3), seed=1)
    _, state = _jit_apply(
        model,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "conv1" and len(mdl.scope.path) == 1,
    )(variables, x)
    stem_out = state["intermediates"]["conv1"]["__call__"][0]
    batch_mean = jnp.mean(stem_out, axis=(0, 1, 2))
    old_mean = variables["batch_stats"]["bn1"]["mean"]
    # torchvision momentum 0.1: running = 0.9 * running + 0.1 * batch.
    np.testing.assert_allclose(
        state["batch_stats"]["bn1"]["mean"], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6
    )


def test_freeze_bn_keeps_and_uses_running_statistics(tiny):
    _, variables = tiny
    frozen = create_backbone("tiny", freeze_bn=True)
    x = _images((4, 32, 32, 3), seed=2)
    out, state = _jit_apply(frozen, train=True, mutable=["batch_stats"])(variables, x)
    np.testing.assert_allclose(out, _jit_apply(frozen)(variables, x), rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
    # ...whereas the unfrozen model normalises with batch statistics in training.
    unfrozen = create_backbone("tiny")
    trained, _ = _jit_apply(unfrozen, train=True, mutable=["batch_stats"])(variables, x)
    assert not np.allclose(trained, out, atol=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
    _, variables = tiny
    model16 = create_backbone("tiny", dtype=jnp.bfloat16)
    x = _images((2, 32, 32, 3), seed=3)
    init16 = jax.eval_shape(lambda x: model16.init(jax.random.key(0), x, train=False), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(init16)} == {jnp.dtype(jnp.float32)}
    out16 = _jit_apply(model16)(variables, x)
    out32 = _jit_apply(create_backbone("tiny"))(variables, x)
    assert out16.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 0 < rel < 5e-2  # bf16 has ~3 significant digits; exactly 0 would mean no bf16 compute


def test_normalize_imagenet_constants():
    frames = jnp.array([[0, 128, 255]], jnp.uint8)
    got = normalize_imagenet(frames)
    want = (np.array([0, 128, 255]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    assert got.dtype == jnp.float32


def test_frame_embedder_folds_time_into_batch(tiny):
    _, backbone_vars = tiny
    embedder = FrameEmbedder(arch="tiny")
    frames = jax.random.randint(jax.random.key(4), (2, 3, 32, 32, 3), 0, 256).astype(jnp.uint8)
    variables = embedder_variables_from_backbone(backbone_vars)
    # The nesting must be exactly what the embedder itself creates.
    own = jax.eval_shape(lambda f: embedder.init(jax.random.key(0), f, train=False), frames)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, variables)

    apply = _jit_apply(embedder)
    out = apply(variables, frames)
    assert out.shape == (2, 3, feature_dim("tiny"))
    assert out.dtype == jnp.float32
    per_frame = _jit_apply(create_backbone("tiny"))(
        backbone_vars, normalize_imagenet(frames.reshape(6, 32, 32, 3))
    )
    np.testing.assert_allclose(out.reshape(6, -1), per_frame, rtol=1e-5, atol=1e-5)
    # Float frames in [0, 255] are the same input as uint8 frames.
    np.testing.assert_allclose(apply(variables, frames.astype(jnp.float32)), out, rtol=1e-5, atol=1e-5)


def test_frame_embedder_trains_with_gradients_and_bf16(tiny):
    _, backbone_vars = tiny
    variables = embedder_variables_from_backbone(backbone_vars)
    frames = jax.random.uniform(jax.random.key(5), (2, 2, 32, 32, 3), maxval=255.0)
    embedder = FrameEmbedder(arch="tiny", dtype=jnp.bfloat16)

    def loss(params):
        out, _ = embedder.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            frames,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    leaves = jax.device_get(jax.tree.leaves(grads))  # checked in NumPy: no program per leaf shape
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in leaves)
    assert np.abs(grads["backbone"]["conv1"]["kernel"]).sum() > 0


def test_save_and_load_backbone_round_trip(tiny, tmp_path):
    model, variables = tiny
    out = save_backbone(tmp_path / "ckpt", "tiny", variables, metadata={"source": "unit test"})
    info = json.loads((out / "backbone.json").read_text())
    assert info["arch"] == "tiny" and info["feature_dim"] == 128 and info["source"] == "unit test"
    assert read_backbone_metadata(out) == info

    loaded_model, loaded = load_backbone(out)
    assert loaded_model.arch == "tiny"
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    x = _images((2, 32, 32, 3), seed=6)
    np.testing.assert_array_equal(_jit_apply(loaded_model)(loaded, x), _jit_apply(model)(variables, x))
    model16, _ = load_backbone(out, dtype=jnp.bfloat16, freeze_bn=True)
    assert model16.dtype == jnp.bfloat16 and model16.freeze_bn

    with pytest.raises(FileExistsError, match="overwrite"):
        save_backbone(out, "tiny", variables)
    save_backbone(out, "tiny", variables, overwrite=True)
    assert read_backbone_metadata(out)["arch"] == "tiny"
    # overwrite never deletes a directory that is not a backbone checkpoint.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no backbone.json"):
        save_backbone(other, "tiny", variables, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_save_backbone_rejects_variables_of_another_arch(tiny, tmp_path):
    _, variables = tiny
    with pytest.raises(ValueError, match=r"layer1_1.*conv1"):
        save_backbone(tmp_path / "ckpt", "resnet18", variables)
    broken = jax.tree.map(lambda x: x, variables)
    del broken["params"]["layer2_0"]["bn2"]
    with pytest.raises(ValueError, match=r"Missing.*layer2_0.*bn2"):
        save_backbone(tmp_path / "ckpt", "tiny", broken)


def test_load_backbone_explains_a_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="import_weights"):
        load_backbone(tmp_path)
    (tmp_path / "backbone.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="tam_jax.backbone"):
        load_backbone(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Rematerialisation (config.model.remat).


def _backbone_grads(arch, remat, variables, x):
    """Gradients of a loss of the training-mode features, and the new BatchNorm statistics."""
    model = create_backbone(arch, remat=remat)

    def loss(params):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                   train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out)), updates  # a cotangent that varies by element

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_remat_gives_the_same_gradients_and_statistics_as_none(arch):
    variables = _random_variables(arch, seed=7)
    x = _images((4, 32, 32, 3), seed=8)
    want = _backbone_grads(arch, "none", variables, x)
    for remat in ("block", "dots_with_no_batch_dims_saveable"):
        got = _backbone_grads(arch, remat, variables, x)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), got, want)
    # The same parameter tree (torchvision names): checkpoints and imported weights load either way.
    assert jax.tree.structure(abstract_variables(arch)) == jax.tree.structure(
        jax.eval_shape(lambda: create_backbone(arch, remat="block").init(jax.random.key(0), x, train=False))
    )


def test_remat_block_lowers_the_compiled_backward_pass_memory():
    # ResNet-50: its bottleneck blocks hold most of the activations (in ResNet-18 at this size the stem
    # does, and plain nn.remat of the stem shows no saving on XLA:CPU).
    variables = abstract_variables("resnet50")
    x = jax.ShapeDtypeStruct((16, 64, 64, 3), jnp.float32)

    def temp_bytes(remat):
        model = create_backbone("resnet50", remat=remat)

        def loss(params, batch_stats, x):
            out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                       mutable=["batch_stats"])
            return jnp.sum(out**2), updates

        step = jax.jit(jax.grad(loss, has_aux=True))
        lowered = step.lower(variables["params"], variables["batch_stats"], x)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("block") < 0.6 * temp_bytes("none")  # measured 84 vs 189 MiB


def test_remat_policy_wraps_every_unit_with_that_policy():
    model = create_backbone("tiny", remat="dots_with_no_batch_dims_saveable")
    variables = abstract_variables("tiny")
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    policies = [e.params["policy"] for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert policies == [jax.checkpoint_policies.dots_with_no_batch_dims_saveable] * 5  # stem + 4 blocks


def test_unknown_remat_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"model\.remat.*block"):
        create_backbone("tiny", remat="blocks")
