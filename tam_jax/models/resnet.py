"""ResNets in torchvision's layout, NHWC, without the classifier head.

The layer names follow torchvision's state-dict keys (`layer2.0.downsample.1` is the Flax module
path `layer2_0/downsample_bn`) so that `tam_jax.tools.import_weights` is a rename plus a kernel
transpose. The Bottleneck is v1.5 (stride on the 3x3 conv), and every padding is written out
explicitly because Flax's "SAME" pads stride-2 convs asymmetrically while PyTorch pads k // 2 on
both sides; with these paddings the Flax and torchvision networks compute the same function.

Rematerialisation (`remat`, `config.model.remat`) trades compute for memory in training. The units are
the stem (conv1, bn1, relu, max-pool) and every residual block. With "block", each unit keeps only its
input for the backward pass and is recomputed there (`_late_remat`); a `jax.checkpoint_policies` name
wraps each unit in `nn.remat` with that policy deciding what inside it is kept. The parameter tree and
the function computed are unchanged.

Why "block" is not plain `nn.remat`: XLA:CPU drops the optimisation barriers that `jax.checkpoint` puts
before the recomputation and schedules it in the forward pass, so the compiled step keeps every
activation (its `memory_analysis()` shows no saving: `benchmarks/README.md`). `_late_remat` makes the
recomputation read the output's cotangent, a data dependency no backend can hoist, so the saving is
real, and visible, on every backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's BatchNorm: eps 1e-5 and running = 0.9 * running + 0.1 * batch (its momentum 0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# `remat` values besides "none" and "block": the `jax.checkpoint_policies` that are policies themselves
# rather than factories taking names. XLA convolutions are not `dot_general`s, so the dots policies keep
# nothing inside a ResNet block: they recompute as much as "block" does.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)
REMAT_CHOICES = ("none", "block", *REMAT_POLICIES)

# Kaiming-normal over fan-out, torchvision's conv initialisation.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Shape of one ResNet: block type, blocks per stage, channel widths."""

    block: str  # "basic" (expansion 1) or "bottleneck" (expansion 4)
    stage_sizes: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * self.expansion


ARCHS: dict[str, ArchSpec] = {
    # One BasicBlock per stage and 16..128 channels: 0.31 M parameters, for CPU tests and demos.
    "tiny": ArchSpec("basic", (1, 1, 1, 1), (16, 32, 64, 128), 16),
    "resnet18": ArchSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": ArchSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64),
}


def arch_spec(arch: str) -> ArchSpec:
    """The `ArchSpec` of `arch`; a ValueError naming the known architectures otherwise."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"Unknown backbone architecture {arch!r}; choose one of {sorted(ARCHS)}.") from None


def feature_dim(arch: str) -> int:
    """Width D of the pooled features of `arch` (512 for resnet18/34, 2048 for resnet50)."""
    return arch_spec(arch).feature_dim


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = kernel // 2  # PyTorch's symmetric padding; Flax "SAME" would pad stride 2 unevenly
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _bn(use_running_average: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def remat_policy(remat: str):
    """The `jax.checkpoint` policy named by a `remat` value in `REMAT_POLICIES`.

    Raises ValueError naming `model.remat` and the choices otherwise.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r} has no checkpoint policy; choose one of "
                         f"{', '.join(REMAT_CHOICES)}.")
    return getattr(jax.checkpoint_policies, remat)


def _stem(module: nn.Module, x: jnp.ndarray, use_running_average: bool, dtype: Any, width: int):
    """conv1 7x7/2 -> bn1 -> relu -> 3x3/2 max-pool, `[B, H, W, 3] -> [B, H/4, W/4, width]`.

    A function of the parent module (not a submodule) so that its layers keep torchvision's names conv1
    and bn1 when it is wrapped in a remat transform.
    """
    del module  # the layers below attach to it: Flax passes the parent scope through
    x = nn.relu(_bn(use_running_average, dtype, "bn1")(_conv(width, 7, 2, dtype, "conv1")(x)))
    # Flax pads max_pool with -inf, as PyTorch does.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _wait_for(x: jnp.ndarray, cotangent: jnp.ndarray) -> jnp.ndarray:
    """`x`, made to depend on `cotangent` (adds 0 times one of its elements) so that what is computed
    from it cannot run before the cotangent exists. A NaN or infinite cotangent makes it NaN, as the
    gradients would be anyway."""
    return x + (cotangent.reshape(-1)[0] * 0).astype(x.dtype)


def _call(module: nn.Module, x: jnp.ndarray) -> jnp.ndarray:
    return module(x)


def _late_remat(fn, unit: nn.Module):
    """`fn(module, x)` for a residual block `module`, whose backward pass recomputes it from `x` alone,
    after the output's cotangent exists.

    Args:
      fn: `(module, x) -> y`, the unit's forward pass on `module`'s variables.
      unit: an unbound module (`parent=None`: not a submodule of the caller) computing the same as `fn`
        from the variables it is given.

    Returns:
      `(module, x) -> y` with a custom VJP: the forward pass keeps x and the unit's variables; the
      backward pass recomputes the unit (BatchNorm with the same batch statistics, its running-average
      update discarded) and takes its VJP. Gradients equal those without rematerialisation.
    """

    def forward(module, x):
        return fn(module, x), (flax.core.unfreeze(module.variables), x)

    def backward(residuals, y_cotangent):
        variables, x = residuals

        def recompute(params, x):
            return unit.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(recompute, variables["params"], _wait_for(x, y_cotangent))
        params_cotangent, x_cotangent = vjp(y_cotangent)
        return {"params": params_cotangent}, x_cotangent

    return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)


class BasicBlock(nn.Module):
    """Two 3x3 convs; `[B, H, W, C] -> [B, H / stride, W / stride, width]`."""

    width: int
    stride: int
    use_running_average: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ura, dt = self.use_running_average, self.dtype
        y = nn.relu(_bn(ura, dt, "bn1")(_conv(self.width, 3, self.stride, dt, "conv1")(x)))
        y = _bn(ura, dt, "bn2")(_conv(self.width, 3, 1, dt, "conv2")(y))
        return nn.relu(y + _shortcut(x, self.width, self.stride, ura, dt))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs; output has `4 * width` channels."""

    width: int
    stride: int
    use_running_average: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ura, dt = self.use_running_average, self.dtype
        y = nn.relu(_bn(ura, dt, "bn1")(_conv(self.width, 1, 1, dt, "conv1")(x)))
        y = nn.relu(_bn(ura, dt, "bn2")(_conv(self.width, 3, self.stride, dt, "conv2")(y)))
        y = _bn(ura, dt, "bn3")(_conv(4 * self.width, 1, 1, dt, "conv3")(y))
        return nn.relu(y + _shortcut(x, 4 * self.width, self.stride, ura, dt))


def _shortcut(
    x: jnp.ndarray, features: int, stride: int, use_running_average: bool, dtype: Any
) -> jnp.ndarray:
    """Identity, or torchvision's `downsample` (1x1 conv + BN) when the shape changes.

    Called inside a block's compact `__call__`, so the submodules belong to that block.
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    y = _conv(features, 1, stride, dtype, "downsample_conv")(x)
    return _bn(use_running_average, dtype, "downsample_bn")(y)


class ResNet(nn.Module):
    """Backbone `[B, H, W, 3]` normalised float images -> `[B, D]` float32 pooled features.

    Attributes:
      arch: a key of `ARCHS`.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and statistics stay float32.
      freeze_bn: BatchNorm always uses, and never updates, its running statistics.
      remat: "none", "block" (the stem and each residual block recomputed in the backward pass) or a
        name in `REMAT_POLICIES` (each unit wrapped as for "block", with that policy).
    """

    arch: str
    dtype: Any = jnp.float32
    freeze_bn: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool) -> jnp.ndarray:
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        spec = arch_spec(self.arch)
        ura, dt = self.freeze_bn or not train, self.dtype
        block_cls = Bottleneck if spec.block == "bottleneck" else BasicBlock
        stem = functools.partial(_stem, use_running_average=ura, dtype=dt, width=spec.stem_width)
        if self.remat == "block":
            # Plain nn.remat for the stem: a custom VJP of a function of this module would differentiate
            # all of its variables, blocks included (and leaks tracers in Flax).
            stem = nn.remat(stem)
        elif self.remat != "none":
            policy = remat_policy(self.remat)
            stem = nn.remat(stem, policy=policy)
            block_cls = nn.remat(block_cls, policy=policy)

        x = stem(self, jnp.asarray(images, dt))
        stages = zip(spec.stage_sizes, spec.widths, strict=True)
        for stage, (num_blocks, width) in enumerate(stages):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                block = block_cls(width, stride, ura, dt, name=f"layer{stage + 1}_{i}")
                if self.remat == "block":
                    unit = block_cls(width, stride, ura, dt, parent=None)
                    x = _late_remat(_call, unit)(block, x)
                else:
                    x = block(x)
        # Average in float32: bfloat16 sums over 7x7 positions lose digits for nothing.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def create_backbone(
    arch: str, *, dtype: Any = jnp.float32, freeze_bn: bool = False, remat: str = "none"
) -> ResNet:
    """The backbone module of `arch` in {"tiny", "resnet18", "resnet34", "resnet50"}.

    `remat` (see `ResNet`) changes memory and time of the backward pass only, never the values.

    `model.apply(variables, images, train=...)` maps normalised `[B, H, W, 3]` images to
    `[B, feature_dim(arch)]` float32 features; variables are {"params", "batch_stats"}, and
    training needs `mutable=["batch_stats"]` unless `freeze_bn`.
    """
    arch_spec(arch)  # fail here, with the list of choices, rather than at first call
    if remat not in REMAT_CHOICES:
        raise ValueError(f"config.model.remat={remat!r} is not one of {', '.join(REMAT_CHOICES)}.")
    return ResNet(arch=arch, dtype=dtype, freeze_bn=freeze_bn, remat=remat)


def abstract_variables(arch: str) -> dict:
    """`jax.ShapeDtypeStruct` tree of the backbone variables of `arch`, without computing them."""
    model = create_backbone(arch)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
