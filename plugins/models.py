"""Model plugins usable as student or teacher: ``torchvision``, ``mlp`` and ``small_cnn``.

kdforge fills in ``num_classes``, ``in_channels`` and ``input_shape`` from the dataset
when a factory accepts them and the recipe leaves them out.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from kdforge import RecipeError, did_you_mean, hookimpl, load_weights

PositiveInt = Annotated[int, Field(ge=1)]
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _classification_archs() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one that takes ``in_channels`` channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
            )
            _replace_module(model, name, new)
            return


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last linear layer for one with ``num_classes`` outputs."""
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("found no linear classifier layer to resize")
    name, module = last[-1]
    _replace_module(model, name, nn.Linear(module.in_features, num_classes, module.bias is not None))


def torchvision_model(
    arch: str,
    num_classes: PositiveInt = 1000,
    in_channels: PositiveInt = 3,
    weights_path: str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Any torchvision classification model by ``arch`` (e.g. resnet18, mobilenet_v2, vgg16).

    Randomly initialized unless ``weights_path`` names a local ``.safetensors``/``.pt``/``.pth``
    state dict. ``pretrained: true`` downloads torchvision's default ImageNet weights: the
    only case that touches the network, and only when asked. ``in_channels`` other than 3
    swaps the first convolution (e.g. 1 for grayscale).
    """
    import torchvision.models as tvm

    archs = _classification_archs()
    if arch not in archs:
        raise RecipeError(f"unknown torchvision arch {arch!r}.{did_you_mean(arch, archs)} "
                          f"(see torchvision.models.list_models())")
    if pretrained:
        model = tvm.get_model(arch, weights="DEFAULT")
        if num_classes != 1000:
            _replace_head(model, num_classes)
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    if weights_path:
        load_weights(model, weights_path)
    return model


class _Dense(nn.Sequential):
    def __init__(self, fan_in: int, fan_out: int, activation: str, dropout: float) -> None:
        super().__init__(nn.Linear(fan_in, fan_out), _ACTIVATIONS[activation]())
        if dropout > 0:
            self.append(nn.Dropout(dropout))


class MLP(nn.Module):
    """Flatten, hidden layers (``hidden.0``, ``hidden.1``, ...), then a linear ``head``."""

    def __init__(
        self,
        num_classes: PositiveInt,
        input_shape: list[PositiveInt],
        hidden: list[PositiveInt] = [64],  # noqa: B006 - never mutated
        activation: Literal["relu", "gelu", "tanh", "silu"] = "relu",
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        fan_in = 1
        for dim in input_shape:
            fan_in *= int(dim)
        blocks = []
        for width in hidden:
            blocks.append(_Dense(fan_in, width, activation, dropout))
            fan_in = width
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(fan_in, num_classes)
        if weights_path:
            load_weights(self, weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(torch.flatten(x, 1)))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (``features.0``, ...), 2x max-pooling while the map is large enough,
    global average pooling and a linear ``classifier``. Made for small inputs such as 8x8 digits."""

    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: PositiveInt,
        input_shape: list[PositiveInt] | None = None,
        channels: list[PositiveInt] = [32, 64],  # noqa: B006 - never mutated
        dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        size = min(input_shape[-2:]) if input_shape and len(input_shape) >= 3 else 32
        blocks = []
        fan_in = in_channels
        for width in channels:
            layers: list[nn.Module] = [
                nn.Conv2d(fan_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),  # not in place, so a tap on the BatchNorm sees its own output
            ]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
            fan_in = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(fan_in, num_classes)
        if weights_path:
            load_weights(self, weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def _register_models(register) -> None:
    register("torchvision", torchvision_model)
    register("mlp", MLP)
    register("small_cnn", SmallCNN)


@hookimpl
def register_students(register) -> None:
    """Register ``torchvision``, ``mlp`` and ``small_cnn`` as students."""
    _register_models(register)


@hookimpl
def register_teachers(register) -> None:
    """Register ``torchvision``, ``mlp`` and ``small_cnn`` as teachers (load weights with ``weights_path``)."""
    _register_models(register)
