"""The reference implementation's DeepLabv3+ (VainF/DeepLabV3Plus-Pytorch: network/_deeplab.py,
network/modeling.py, network/backbone/mobilenetv2.py), written down here from its published
source as an independent test fixture: the "expected" side of the import tests must not be
built from our own model. Its ResNets are torchvision's (the reference copies them).

Kept as the reference has it, differences included: MobileNetV2's convolutions never pad
(`ConvBNReLU` has padding 0), and each inverted residual zero-pads its *input* for the 3x3
depthwise conv, before the 1x1 expansion.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50, resnet101

# -- network/backbone/mobilenetv2.py -----------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, dilation=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, 0, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


def fixed_padding(kernel_size, dilation):
    effective = kernel_size + (kernel_size - 1) * (dilation - 1)
    total = effective - 1
    beg = total // 2
    return (beg, total - beg, beg, total - beg)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, dilation, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvBNReLU(inp, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.input_padding = fixed_padding(3, dilation)

    def forward(self, x):
        out = self.conv(F.pad(x, self.input_padding))
        return x + out if self.use_res_connect else out


class MobileNetV2Features(nn.Module):
    """`MobileNetV2(output_stride)` as `_segm_mobilenet` uses it: features[0:4] and [4:-1]."""

    SETTING = [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, output_stride):
        super().__init__()
        features = [ConvBNReLU(3, 32, stride=2)]
        current_stride, dilation, cin = 2, 1, 32
        for t, c, n, s in self.SETTING:
            previous_dilation = dilation
            if current_stride == output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                first = i == 0
                features.append(
                    InvertedResidual(cin, c, stride if first else 1, previous_dilation if first else dilation, t)
                )
                cin = c
        features.append(ConvBNReLU(cin, 1280, kernel_size=1))
        features = nn.Sequential(*features)  # slices of a Sequential keep its indices as names
        self.low_level_features = features[0:4]
        self.high_level_features = features[4:-1]

    def forward(self, x):
        low = self.low_level_features(x)
        return OrderedDict(low_level=low, out=self.high_level_features(low))


class ResNetFeatures(nn.Module):
    def __init__(self, depth, output_stride):
        super().__init__()
        dilate = [False, True, True] if output_stride == 8 else [False, False, True]
        net = {50: resnet50, 101: resnet101}[depth](replace_stride_with_dilation=dilate)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return OrderedDict(low_level=low, out=self.layer4(self.layer3(self.layer2(low))))


# -- network/_deeplab.py -------------------------------------------------------------------------


def _conv_bn_relu(cin, cout, k, dilation=1):
    pad = 0 if k == 1 else dilation
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class ASPPPooling(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1))

    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin, rates):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(cin, 256, 1))]
            + [nn.Sequential(*_conv_bn_relu(cin, 256, 3, r)) for r in rates]
            + [ASPPPooling(cin, 256)]
        )
        self.project = nn.Sequential(*_conv_bn_relu(5 * 256, 256, 1), nn.Dropout(0.1))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHeadV3Plus(nn.Module):
    def __init__(self, cin, low_level_channels, num_classes, rates):
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(low_level_channels, 48, 1))
        self.aspp = ASPP(cin, rates)
        self.classifier = nn.Sequential(*_conv_bn_relu(304, 256, 3), nn.Conv2d(256, num_classes, 1))

    def forward(self, feature):
        low = self.project(feature["low_level"])
        out = F.interpolate(self.aspp(feature["out"]), size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, out], dim=1))


class AtrousSeparableConvolution(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, dilation, bias):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size, stride, padding, dilation, groups=cin, bias=bias),
            nn.Conv2d(cin, cout, 1, bias=bias),
        )

    def forward(self, x):
        return self.body(x)


def convert_to_separable_conv(module):
    new = module
    if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
        new = AtrousSeparableConvolution(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.bias is not None,
        )
    for name, child in module.named_children():
        new.add_module(name, convert_to_separable_conv(child))
    return new


class DeepLabV3Plus(nn.Module):
    """`modeling.deeplabv3plus_<backbone>(num_classes, output_stride)`, optionally with
    `convert_to_separable_conv(model.classifier)` as its training script does."""

    def __init__(self, backbone, num_classes, output_stride, separable=False):
        super().__init__()
        rates = [12, 24, 36] if output_stride == 8 else [6, 12, 18]
        if backbone == "mobilenet_v2":
            self.backbone, cin, low = MobileNetV2Features(output_stride), 320, 24
        else:
            self.backbone, cin, low = ResNetFeatures(int(backbone.removeprefix("resnet")), output_stride), 2048, 256
        self.classifier = DeepLabHeadV3Plus(cin, low, num_classes, rates)
        if separable:
            self.classifier = convert_to_separable_conv(self.classifier)

    def forward(self, x):
        logits = self.classifier(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
