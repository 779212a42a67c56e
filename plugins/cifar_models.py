"""CIFAR benchmark architectures for distillation (the CRD CIFAR-100 model zoo).

The students and teachers of the standard CIFAR-100 knowledge-distillation benchmark
(Tian et al. 2020, "Contrastive Representation Distillation"), for 32x32 inputs:

- CIFAR ResNets (He et al. 2016): ``resnet8`` ... ``resnet110`` (depth 6n+2, BasicBlocks,
  stage widths 16/32/64) and ``resnet8x4`` / ``resnet32x4`` (widths 64/128/256 after a
  32-channel stem). Downsampling shortcuts are a 1x1 conv + BN.
- Wide ResNets (Zagoruyko & Komodakis 2016): ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``
  (pre-activation blocks, widths 16, 16k, 32k, 64k).
- VGG with batch norm (Simonyan & Zisserman 2015, CIFAR variant as in CRD): ``vgg8``
  (one conv per stage) and ``vgg13`` (two per stage), widths 64/128/256/512/512.

Every factory takes ``num_classes`` (default 100), ``in_channels`` (default 3) and
``weights_path`` (a local ``.safetensors``/``.pt``/``.pth`` state dict); kdforge fills
in ``num_classes`` and ``in_channels`` from the dataset when the recipe leaves them out.
Each architecture is registered under its name as both a student and a teacher.

Feature taps: :data:`TAPS` lists the recommended tap names per architecture (names as
``model.get_submodule`` accepts them). No module in these models modifies its input or
another module's output in place, so every tap sees the value its module returned.
Global average pooling is adaptive, so inputs of any size from 8x8 up work.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdforge import hookimpl, load_weights

PositiveInt = Annotated[int, Field(ge=1)]
DropRate = Annotated[float, Field(ge=0.0, lt=1.0)]

#: Recommended feature-tap names per architecture (stage outputs, shallow to deep).
#: ResNets: post-ReLU stage outputs; WRNs: block outputs (pre-activation, as in the
#: paper's design) plus ``bn1`` (the final BN before the last ReLU); VGGs: post-ReLU
#: stage outputs.
TAPS: dict[str, list[str]] = {
    **{name: ["layer1", "layer2", "layer3"] for name in (
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4",
    )},
    **{name: ["block1", "block2", "block3", "bn1"] for name in ("wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: ["block0", "block1", "block2", "block3", "block4"] for name in ("vgg8", "vgg13")},
}


def recommended_taps(arch: str) -> list[str]:
    """The recommended feature-tap names for ``arch`` (a copy of ``TAPS[arch]``)."""
    return list(TAPS[arch])


def _init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal convs (fan_out, ReLU gain), zero conv biases, BN weight 1 and bias 0.

    Linear layers keep PyTorch's default weights unless ``linear_std`` is given; their
    biases start at 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


# --------------------------------------------------------------------------- ResNet (CIFAR)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """3x3 stem ``conv1``/``bn1``, three stages ``layer1``-``layer3`` of BasicBlocks (strides 1, 2, 2),
    global average pooling ``avgpool`` and a linear ``fc``. Depth = 6 * blocks_per_stage + 2."""

    def __init__(
        self,
        blocks_per_stage: int,
        widths: tuple[int, int, int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_planes = stem_width
        stages = []
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, width, stride if b == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(depth: int, num_classes: int, in_channels: int, weights_path: str | None,
            widths: tuple[int, int, int] = (16, 32, 64), stem_width: int = 16) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError("CIFAR ResNet depth must be 6n+2")
    model = CifarResNet((depth - 2) // 6, widths, stem_width, num_classes, in_channels)
    if weights_path:
        load_weights(model, weights_path)
    return model


def resnet8(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
            weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-8 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(8, num_classes, in_channels, weights_path)


def resnet14(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
             weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-14 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(14, num_classes, in_channels, weights_path)


def resnet20(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
             weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(20, num_classes, in_channels, weights_path)


def resnet32(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
             weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-32 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(32, num_classes, in_channels, weights_path)


def resnet44(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
             weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-44 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(44, num_classes, in_channels, weights_path)


def resnet56(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
             weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-56 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(56, num_classes, in_channels, weights_path)


def resnet110(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
              weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-110 (He et al. 2016), widths 16/32/64; taps: layer1, layer2, layer3."""
    return _resnet(110, num_classes, in_channels, weights_path)


def resnet8x4(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
              weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-8x4 (He et al. 2016; 4x wide, as in CRD), widths 64/128/256; taps: layer1, layer2, layer3."""
    return _resnet(8, num_classes, in_channels, weights_path, widths=(64, 128, 256), stem_width=32)


def resnet32x4(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
               weights_path: str | None = None) -> CifarResNet:
    """CIFAR ResNet-32x4 (He et al. 2016; 4x wide, as in CRD), widths 64/128/256; taps: layer1, layer2, layer3."""
    return _resnet(32, num_classes, in_channels, weights_path, widths=(64, 128, 256), stem_width=32)


# --------------------------------------------------------------------------- Wide ResNet


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input;
    otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        identity = x if self.shortcut is None else self.shortcut(pre)
        return out + identity


class WideResNet(nn.Module):
    """WRN-d-k: stem ``conv1`` (16 channels), stages ``block1``-``block3`` of pre-activation blocks
    (widths 16k, 32k, 64k; strides 1, 2, 2), final ``bn1`` + ReLU, ``avgpool`` and a linear ``fc``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("Wide ResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, widths[0])
        in_planes = widths[0]
        stages = []
        for index, width in enumerate(widths[1:]):
            stride = 1 if index == 0 else 2
            blocks = []
            for b in range(n):
                blocks.append(WideBasicBlock(in_planes, width, stride if b == 0 else 1, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _wrn(depth: int, widen_factor: int, num_classes: int, in_channels: int, dropout: float,
         weights_path: str | None) -> WideResNet:
    model = WideResNet(depth, widen_factor, num_classes, in_channels, dropout)
    if weights_path:
        load_weights(model, weights_path)
    return model


def wrn_16_2(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3, dropout: DropRate = 0.0,
             weights_path: str | None = None) -> WideResNet:
    """Wide ResNet 16-2 (Zagoruyko & Komodakis 2016); taps: block1, block2, block3, bn1."""
    return _wrn(16, 2, num_classes, in_channels, dropout, weights_path)


def wrn_40_1(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3, dropout: DropRate = 0.0,
             weights_path: str | None = None) -> WideResNet:
    """Wide ResNet 40-1 (Zagoruyko & Komodakis 2016); taps: block1, block2, block3, bn1."""
    return _wrn(40, 1, num_classes, in_channels, dropout, weights_path)


def wrn_40_2(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3, dropout: DropRate = 0.0,
             weights_path: str | None = None) -> WideResNet:
    """Wide ResNet 40-2 (Zagoruyko & Komodakis 2016); taps: block1, block2, block3, bn1."""
    return _wrn(40, 2, num_classes, in_channels, dropout, weights_path)


# --------------------------------------------------------------------------- VGG (CIFAR)

_VGG_WIDTHS = (64, 128, 256, 512, 512)


class CifarVGG(nn.Module):
    """Five conv stages ``block0``-``block4`` (each conv3x3-BN-ReLU, repeated), 2x2 max-pools
    ``pool0``-``pool3`` between stages, adaptive average pooling ``pool4`` and a linear
    ``classifier`` (512 -> num_classes).

    As in CRD, the pool between ``block3`` and ``block4`` runs only for inputs of 64 px or
    more, so 32x32 inputs reach ``block3``/``block4`` at 4x4 (and 8x8 inputs still work).
    """

    def __init__(self, convs_per_stage: int, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        fan_in = in_channels
        for index, width in enumerate(_VGG_WIDTHS):
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [_conv3x3(fan_in, width, bias=True), nn.BatchNorm2d(width), nn.ReLU()]
                fan_in = width
            self.add_module(f"block{index}", nn.Sequential(*layers))
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(fan_in, num_classes)
        _init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = x.shape[-2] >= 64
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if large:
            x = self.pool3(x)
        x = self.pool4(self.block4(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(convs_per_stage: int, num_classes: int, in_channels: int, weights_path: str | None) -> CifarVGG:
    model = CifarVGG(convs_per_stage, num_classes, in_channels)
    if weights_path:
        load_weights(model, weights_path)
    return model


def vgg8(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
         weights_path: str | None = None) -> CifarVGG:
    """CIFAR VGG-8 with BN (Simonyan & Zisserman 2015, as in CRD); taps: block0, block1, block2, block3, block4."""
    return _vgg(1, num_classes, in_channels, weights_path)


def vgg13(num_classes: PositiveInt = 100, in_channels: PositiveInt = 3,
          weights_path: str | None = None) -> CifarVGG:
    """CIFAR VGG-13 with BN (Simonyan & Zisserman 2015, as in CRD); taps: block0, block1, block2, block3, block4."""
    return _vgg(2, num_classes, in_channels, weights_path)


# --------------------------------------------------------------------------- registration

#: architecture name -> factory
ARCHITECTURES = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
}


def _register_models(register) -> None:
    for name, factory in ARCHITECTURES.items():
        register(name, factory)


@hookimpl
def register_students(register) -> None:
    """Register the CIFAR benchmark architectures (CIFAR ResNets, WRNs, VGGs) as students."""
    _register_models(register)


@hookimpl
def register_teachers(register) -> None:
    """Register the CIFAR benchmark architectures as teachers (load weights with ``weights_path``)."""
    _register_models(register)
