"""DeepLabv3+ (Chen et al. 2018): dilated backbone, ASPP, decoder on stride-4 features.

Module and parameter names follow the widely used PyTorch reference implementation
(`backbone.*`, `classifier.aspp.*`, `classifier.project.*`, `classifier.classifier.*`), so its
published checkpoints map onto this model one to one.

Two registries: models (`@register_model`, what `model.factory` names; a user's own model is
any importable `pkg.module:callable` with the same signature) and DeepLabv3+ backbones
(`@register_backbone`, what `model.backbone` names, with their ImageNet weights registered
beside them). Both listings double as the test matrix. This module knows nothing of Ray or
MLflow.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models._utils import IntermediateLayerGetter

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.trainable.registry import Registry
from deeplab_sweep.trainable.weights import PretrainedWeightsMissing, imagenet_state

# A model factory: (num_classes, the run's ModelConfig) -> module mapping N x 3 x H x W images
# to N x num_classes x H x W logits.
ModelFactory = Callable[..., nn.Module]
MODELS = Registry("model")
# A backbone factory: (output_stride, norm, imagenet_state or None) -> Backbone; registered
# with `weights=` (a torchvision WeightsEnum) when ImageNet weights exist for it.
BACKBONES = Registry("backbone")
Norm = Callable[[int], nn.Module]  # channels -> normalisation layer
register_model = MODELS.register
register_backbone = BACKBONES.register


class ModelFactoryError(ConfigError):
    pass


def registered_models() -> list[str]:
    return MODELS.names()


def registered_backbones() -> list[str]:
    return BACKBONES.names()


def resolve_factory(spec: str) -> ModelFactory:
    """A registered model name, or `pkg.module:callable` imported now."""
    if spec in MODELS:
        return MODELS.get(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelFactoryError(
            f"model.factory = {spec!r}: not a registered model "
            f"({', '.join(registered_models())}) nor 'pkg.module:callable'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error while importing
        raise ModelFactoryError(
            f"model.factory = {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelFactoryError(f"model.factory = {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


def norm_layer(kind: str) -> Norm:
    """`model.norm`: BatchNorm (also for syncbn: converted when DDP runs on GPUs) or GroupNorm,
    which does not depend on the per-GPU batch. Groups of 32 channels where they divide, else
    the largest divisor of 32 that does (48 channels -> 16 groups)."""
    if kind == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if kind in ("bn", "syncbn"):
        return nn.BatchNorm2d
    raise ValueError(f"model.norm must be bn, syncbn or gn, got {kind!r}")


class Backbone(nn.Module):
    """Feature extractor returning {"low_level": stride-4 map, "out": stride-OS map}."""

    low_level_channels: int
    out_channels: int


def backbone_weights_of(backbone: str) -> tvm.WeightsEnum:
    """The ImageNet weights registered with a backbone."""
    weights = BACKBONES.meta(backbone, "weights")
    if weights is None:
        raise PretrainedWeightsMissing(
            f"model.pretrained_backbone: backbone {backbone!r} has no ImageNet weights registered "
            f"(register it with @register_backbone({backbone!r}, weights=...)), or set model.pretrained_backbone=false"
        )
    return weights


class _ResNet(Backbone):
    low_level_channels, out_channels = 256, 2048

    def __init__(self, depth: int, output_stride: int, norm: Norm, state: dict | None):
        super().__init__()
        ctor = {50: tvm.resnet50, 101: tvm.resnet101}[depth]
        # OS 16 dilates layer4; OS 8 dilates layer3 and layer4 (stride kept, receptive field grows).
        dilate = [False, output_stride == 8, True]
        net = ctor(weights=None, replace_stride_with_dilation=dilate, norm_layer=norm)
        if state is not None:
            net.load_state_dict(state)
        self.body = IntermediateLayerGetter(net, return_layers={"layer4": "out", "layer1": "low_level"})

    def forward(self, x):
        return self.body(x)


@register_backbone("resnet50", weights=tvm.ResNet50_Weights.IMAGENET1K_V1)
def resnet50(output_stride: int = 16, norm: Norm = nn.BatchNorm2d, state: dict | None = None) -> Backbone:
    return _ResNet(50, output_stride, norm, state)


@register_backbone("resnet101", weights=tvm.ResNet101_Weights.IMAGENET1K_V1)
def resnet101(output_stride: int = 16, norm: Norm = nn.BatchNorm2d, state: dict | None = None) -> Backbone:
    return _ResNet(101, output_stride, norm, state)


class _MobileNetV2Features(nn.Module):
    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.low_level_features = features[:4]  # stride 4, 24 channels
        self.high_level_features = features[4:-1]  # up to the 320-channel block (1280 conv dropped)


class _MobileNetV2(Backbone):
    low_level_channels, out_channels = 24, 320

    def __init__(self, output_stride: int, norm: Norm, state: dict | None, reference_padding: bool = False):
        super().__init__()
        net = tvm.mobilenet_v2(weights=None, norm_layer=norm)
        if state is not None:
            net.load_state_dict(state)
        _dilate_mobilenet(net.features, output_stride)
        if reference_padding:
            _pad_like_reference(net.features)
        self.body = IntermediateLayerGetter(
            _MobileNetV2Features(net.features),
            return_layers={"high_level_features": "out", "low_level_features": "low_level"},
        )

    def forward(self, x):
        return self.body(x)


def _dilate_mobilenet(features: nn.Sequential, output_stride: int) -> None:
    """Turn strides beyond `output_stride` into dilation, in place (weights unchanged)."""
    stride, dilation = 1, 1
    for block in features:
        dw = next((m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)), None)
        if dw is None:
            continue
        s = dw.stride[0]
        if s == 2 and stride * 2 > output_stride:
            dw.stride = (1, 1)
            first_dilation = dilation
            dilation *= 2
            # The first block of a stage keeps the previous dilation, as the reference does.
            dw.dilation, dw.padding = (first_dilation, first_dilation), (first_dilation, first_dilation)
        else:
            stride *= s
            if s == 1:
                dw.dilation, dw.padding = (dilation, dilation), (dilation, dilation)


@register_backbone("mobilenet_v2", weights=tvm.MobileNet_V2_Weights.IMAGENET1K_V1)
def mobilenet_v2(output_stride: int = 16, norm: Norm = nn.BatchNorm2d, state: dict | None = None) -> Backbone:
    return _MobileNetV2(output_stride, norm, state)


class _ReferenceInvertedResidual(nn.Module):
    """The reference implementation's MobileNetV2 block over torchvision's parameters (same
    names): the block's input is zero-padded for its 3x3 depthwise conv before the 1x1
    expansion, so the border of the expanded map is what the expansion makes of zeros."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv, self.use_res_connect = block.conv, block.use_res_connect
        depthwise = next(m for m in block.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        d = depthwise.dilation[0]
        depthwise.padding = (0, 0)
        self.pad = (d, d, d, d)  # a dilated 3x3 kernel spans 2d + 1

    def forward(self, x):
        out = self.conv(F.pad(x, self.pad))
        return x + out if self.use_res_connect else out


def _pad_like_reference(features: nn.Sequential) -> None:
    """The reference's convolutions never pad: its stem has none, its blocks pad their input."""
    features[0][0].padding = (0, 0)
    for i in range(1, len(features) - 1):
        features[i] = _ReferenceInvertedResidual(features[i])


@register_backbone("mobilenet_v2_reference", weights=tvm.MobileNet_V2_Weights.IMAGENET1K_V1)
def mobilenet_v2_reference(output_stride: int = 16, norm: Norm = nn.BatchNorm2d, state: dict | None = None) -> Backbone:
    """MobileNetV2 padded as the reference implementation pads it: what its published MobileNet
    checkpoints were trained with (`deeplab import-checkpoint` picks it for them)."""
    return _MobileNetV2(output_stride, norm, state, reference_padding=True)


def _conv_bn_relu(cin: int, cout: int, k: int, norm: Norm, dilation: int = 1) -> list[nn.Module]:
    pad = 0 if k == 1 else dilation
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), norm(cout), nn.ReLU(inplace=True)]


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: Norm):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1, norm))

    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, int, int], norm: Norm, cout: int = 256):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(cin, cout, 1, norm))]
            + [nn.Sequential(*_conv_bn_relu(cin, cout, 3, norm, r)) for r in rates]
            + [ASPPPooling(cin, cout, norm)]
        )
        self.project = nn.Sequential(*_conv_bn_relu(5 * cout, cout, 1, norm), nn.Dropout(0.1))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHeadV3Plus(nn.Module):
    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        rates: tuple[int, int, int],
        norm: Norm = nn.BatchNorm2d,
    ):
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(low_level_channels, 48, 1, norm))
        self.aspp = ASPP(in_channels, rates, norm)
        self.classifier = nn.Sequential(*_conv_bn_relu(304, 256, 3, norm), nn.Conv2d(256, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.project(feats["low_level"])
        high = F.interpolate(self.aspp(feats["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, high], dim=1))


class SeparableConv2d(nn.Sequential):
    """Depthwise (atrous) 3x3 followed by pointwise 1x1, replacing a dense 3x3."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(
            nn.Conv2d(
                conv.in_channels,
                conv.in_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                groups=conv.in_channels,
                bias=conv.bias is not None,
            ),
            nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None),
        )
        for m in self:
            nn.init.kaiming_normal_(m.weight)


def _separable(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
            setattr(module, name, SeparableConv2d(child))
        else:
            _separable(child)


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        output_stride: int,
        separable: bool = False,
        norm: Norm = nn.BatchNorm2d,
    ):
        super().__init__()
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        # The reference registers the getter itself as `backbone`: keep its key names.
        self.backbone = backbone.body
        self.classifier = DeepLabHeadV3Plus(
            backbone.out_channels, backbone.low_level_channels, num_classes, rates, norm
        )
        if separable:
            _separable(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, backbone_lr_mult: float) -> list[dict]:
        return [
            {"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_mult},
            {"params": list(self.classifier.parameters()), "lr": lr},
        ]


def build_model(
    backbone: str,
    num_classes: int,
    output_stride: int = 16,
    pretrained_backbone: bool = False,
    separable: bool = False,
    weights_file: str | None = None,
    norm: str = "bn",
) -> DeepLabV3Plus:
    factory = BACKBONES.get(backbone)
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    head_norm = norm_layer(norm)
    # ImageNet weights carry BatchNorm statistics: a pretrained backbone keeps BN whatever the head uses.
    backbone_norm = norm_layer("bn") if pretrained_backbone else head_norm
    state = imagenet_state(backbone_weights_of(backbone), weights_file) if pretrained_backbone else None
    net = factory(output_stride=output_stride, norm=backbone_norm, state=state)
    return DeepLabV3Plus(net, num_classes, output_stride, separable, head_norm)


@register_model("deeplabv3plus")
def deeplabv3plus(num_classes: int, cfg) -> DeepLabV3Plus:
    return build_model(
        cfg.backbone,
        num_classes,
        cfg.output_stride,
        cfg.pretrained_backbone,
        cfg.separable,
        cfg.backbone_weights,
        cfg.norm,
    )


def build_from_config(model_cfg, num_classes: int) -> nn.Module:
    return resolve_factory(model_cfg.factory)(num_classes, model_cfg)


def check_model(model_cfg, num_classes: int, size: int = 65) -> int:
    """Build the model and run one tiny batch through it: a factory that fails or returns the
    wrong shape is named here, before any cluster work. Odd size: catches off-by-one upsampling.
    Returns the model's parameter count."""
    spec = model_cfg.factory
    # Shapes and a parameter count need no initialised weights: a registered model is built on
    # torch's meta device and given uninitialised CPU memory (a ResNet-101 checks in 0.2 s rather
    # than 0.7 s). A user's factory builds as it would anyway: a tensor it caches would stay meta.
    registered = spec in MODELS
    try:
        with torch.device("meta") if registered else contextlib.nullcontext():
            model = build_from_config(model_cfg.model_copy(update={"pretrained_backbone": False}), num_classes)
    except ModelFactoryError:
        raise
    except Exception as e:
        raise ModelFactoryError(f"model.factory = {spec!r} failed to build ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"model.factory = {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if registered:
        model.to_empty(device="cpu")
    x = torch.zeros(2, 3, size, size)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise ModelFactoryError(
            f"model.factory = {spec!r}: forward of a 2x3x{size}x{size} batch failed ({type(e).__name__}: {e})"
        ) from None
    want = (2, num_classes, size, size)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelFactoryError(
            f"model.factory = {spec!r}: a 2x3x{size}x{size} batch gave {got}; "
            f"expected logits of shape {want} (N x num_classes x H x W)"
        )
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float) -> list[dict]:
    """The model's own groups where it defines them (DeepLabv3+: backbone, head), else one."""
    if hasattr(model, "param_groups"):
        return model.param_groups(lr, backbone_lr_mult)
    return [{"params": list(model.parameters()), "lr": lr}]
