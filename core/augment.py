"""Replayable augmentations: random transforms whose draws can be stored and applied again exactly.

The teacher-output cache stores a few augmented views per sample (FKD, Shen & Xing 2022):
each view's random parameters (a crop box, a flip) are kept beside the teacher's outputs for
it, and training replays them, so the student sees exactly the pixels the teacher saw. A
dataset takes part by implementing ``kdforge.ReplaysAugmentation``; the simplest way is
``ReplayableDataset(base, augmentation, finish)`` over a dataset of un-augmented image
tensors, with an augmentation built from the classes here.

Every augmentation works on a ``(C, H, W)`` tensor, draws its parameters as a 1-D float
tensor of a fixed length from a ``torch.Generator``, and applies given parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class Augmentation:
    """Base class: ``sample`` draws parameters, ``apply`` applies them, ``spec`` describes the transform."""

    #: length of the parameter vector
    size: int = 0

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """Parameters for one image of ``shape`` (C, H, W)."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``image`` transformed with exactly ``params``."""
        raise NotImplementedError

    def out_shape(self, shape: Sequence[int], params: torch.Tensor) -> list[int]:
        """The shape of the result for an input of ``shape`` (the same, unless the transform crops)."""
        return list(shape)

    def spec(self) -> dict[str, Any]:
        """What this transform is, as JSON (part of a cache's fingerprint)."""
        return {"name": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw and apply in one go (``torch.default_generator`` unless given)."""
        return self.apply(image, self.sample(generator or torch.default_generator, image.shape))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(1, generator=generator))


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved down by ``dy`` and right by ``dx`` pixels, zeros where it leaves."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


class RandomShift(Augmentation):
    """Move the image by up to ``max_shift`` pixels in each direction (zero fill): a padded random crop."""

    size = 2

    def __init__(self, max_shift: int) -> None:
        self.max_shift = int(max_shift)

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        s = self.max_shift
        return torch.tensor([_randint(generator, -s, s), _randint(generator, -s, s)], dtype=torch.float32)

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return shift_image(image, int(params[0]), int(params[1]))


class RandomCrop(Augmentation):
    """Zero-pad by ``padding``, then crop ``size`` x ``size`` at a random place (torchvision's RandomCrop)."""

    size = 2

    def __init__(self, crop: int, padding: int = 0) -> None:
        self.crop, self.padding = int(crop), int(padding)

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        h, w = shape[-2] + 2 * self.padding, shape[-1] + 2 * self.padding
        if h < self.crop or w < self.crop:
            raise ValueError(f"cannot crop {self.crop}x{self.crop} from a padded {h}x{w} image")
        return torch.tensor([_randint(generator, 0, h - self.crop), _randint(generator, 0, w - self.crop)],
                            dtype=torch.float32)

    def out_shape(self, shape: Sequence[int], params: torch.Tensor) -> list[int]:
        return [*shape[:-2], self.crop, self.crop]

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        padded = F.pad(image, [self.padding] * 4) if self.padding else image
        top, left = int(params[0]), int(params[1])
        return padded[..., top:top + self.crop, left:left + self.crop]


class RandomResizedCrop(Augmentation):
    """A crop of random area and aspect ratio, resized to ``crop`` x ``crop`` (torchvision's algorithm)."""

    size = 4

    def __init__(self, crop: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.crop, self.scale, self.ratio = int(crop), tuple(scale), tuple(ratio)

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        height, width = int(shape[-2]), int(shape[-1])
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, *log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return torch.tensor([_randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w],
                                    dtype=torch.float32)
        in_ratio = width / height  # fall back to a central crop, as torchvision does
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return torch.tensor([(height - h) // 2, (width - w) // 2, h, w], dtype=torch.float32)

    def out_shape(self, shape: Sequence[int], params: torch.Tensor) -> list[int]:
        return [*shape[:-2], self.crop, self.crop]

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        top, left, h, w = (int(p) for p in params)
        box = image[..., top:top + h, left:left + w]
        resized = F.interpolate(box.unsqueeze(0).float(), size=(self.crop, self.crop), mode="bilinear",
                                align_corners=False, antialias=True)
        return resized.squeeze(0).to(image.dtype)


class HorizontalFlip(Augmentation):
    """Mirror left-right with probability ``p``."""

    size = 1

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        return torch.tensor([1.0 if float(torch.rand(1, generator=generator)) < self.p else 0.0])

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if bool(params[0] > 0.5) else image


class Chain(Augmentation):
    """Several augmentations in order; their parameters side by side."""

    def __init__(self, steps: Sequence[Augmentation]) -> None:
        self._steps = list(steps)
        self.size = sum(step.size for step in self._steps)

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        parts, shape = [], list(shape)
        for step in self._steps:
            params = step.sample(generator, shape)
            parts.append(params)
            shape = step.out_shape(shape, params)  # what the next step sees
        return torch.cat(parts) if parts else torch.zeros(0)

    def out_shape(self, shape: Sequence[int], params: torch.Tensor) -> list[int]:
        offset = 0
        for step in self._steps:
            shape = step.out_shape(shape, params[offset:offset + step.size])
            offset += step.size
        return list(shape)

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        offset = 0
        for step in self._steps:
            image = step.apply(image, params[offset:offset + step.size])
            offset += step.size
        return image

    def spec(self) -> dict[str, Any]:
        return {"name": "Chain", "steps": [step.spec() for step in self._steps]}


class ReplayableDataset(Dataset):
    """``base`` items ``(image tensor, target)`` with a replayable augmentation, then ``finish`` (normalize, say).

    Implements ``kdforge.ReplaysAugmentation``. Indexing it (``dataset[i]``) draws fresh
    parameters from torch's global generator, as a torchvision transform would; kdforge
    itself draws from a stream per sample, or replays stored parameters.
    """

    def __init__(self, base: Dataset, augmentation: Augmentation,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None, finish_spec: Any = None) -> None:
        self.base, self.augmentation, self.finish = base, augmentation, finish
        self.finish_spec = finish_spec
        if hasattr(base, "targets"):
            self.targets = base.targets

    def __getattr__(self, name: str) -> Any:
        # what the base dataset tells about itself (classes, samples, ...) passes through
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.draw_augmented(index, torch.default_generator)[0]

    def augmentation_spec(self) -> Mapping[str, Any]:
        """The augmentation and what follows it, as JSON."""
        return {"augmentation": self.augmentation.spec(), "finish": self.finish_spec}

    def draw_augmented(self, index: int, generator: torch.Generator) -> tuple[tuple[Any, Any], torch.Tensor]:
        """An augmented item and the parameters it was drawn with."""
        image, target = self.base[index]
        params = self.augmentation.sample(generator, image.shape)
        return self._finish(self.augmentation.apply(image, params), target), params

    def replay_augmented(self, index: int, params: torch.Tensor) -> tuple[Any, Any]:
        """The item with exactly these augmentation parameters."""
        image, target = self.base[index]
        return self._finish(self.augmentation.apply(image, params), target)

    def _finish(self, image: torch.Tensor, target: Any) -> tuple[Any, Any]:
        return (self.finish(image) if self.finish is not None else image), target
