"""Segmentation models: the paper's FCN-ResNet50 and a small CPU-friendly encoder-decoder.

Nothing is downloaded: torchvision's FCN is built with ``weights=None, weights_backbone=None``
and backbone weights come only from a local file the user names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from keyshard.errors import KeyshardError
from keyshard.shardformat import NUM_CLASSES
from keyshard.train.presets import SEGMENTATION_MODELS as MODELS


def _block(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallSegNet(nn.Module):
    """Compact encoder-decoder (output stride 8, one skip at stride 2): trains on the CPU in minutes.

    The decoder fuses at half resolution and upsamples the logits bilinearly, which keeps the
    cost of full-resolution convolutions to the first layer.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w), _block(w, w, stride=2))
        self.down1 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.down2 = nn.Sequential(_block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w, dilation=2),
                                   _block(4 * w, 4 * w, dilation=4))
        self.up = _block(4 * w + w, 2 * w)
        self.head = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.down2(self.down1(s))
        y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.up(torch.cat([y, s], dim=1)))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def stem_stride(block_size: int) -> int:
    """The block-aligned stem's stride: M itself, or the smallest multiple of M that is ≥ 4."""
    return block_size * max(1, -(-4 // block_size))


class BlockAlignedSegNet(nn.Module):
    """Segmentation network whose first layer sees whole key blocks and nothing else.

    The stem is one convolution with kernel = stride = S (S a multiple of the block size M), a
    linear map of the S×S×3 values of each patch.  A block key (SHF permutation, NP flip) is an
    affine map of those values, so it can be folded into the stem's weights exactly
    (``keyshard protect``).  The body works on the patch grid and the logits are upsampled
    bilinearly to full size (a pixel-shuffle head trained far worse on the toy data).
    """

    def __init__(self, block_size: int, num_classes: int = NUM_CLASSES, width: int = 128):
        super().__init__()
        s = stem_stride(block_size)
        self.block_size, self.stride = block_size, s
        self.stem = nn.Conv2d(3, width, kernel_size=s, stride=s)
        self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                  _block(width, width), _block(width, width, dilation=2), _block(width, width))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        y = self.head(self.body(self.stem(x)))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def build_model(name: str, weights: str | None = None, aux_loss: bool = True,
                block_size: int | None = None, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A model returning ``{"out": logits[, "aux": logits]}`` at input resolution, with
    ``num_classes`` outputs (the dataset's, from ``shardformat.dataset_info``; VOC's 21 by default)."""
    if name == "small":
        model = SmallSegNet(num_classes)
    elif name == "block_aligned":
        if not block_size:
            raise KeyshardError("the block_aligned model needs a block size (`block_size`, on plain shards)")
        model = BlockAlignedSegNet(block_size, num_classes)
    elif name == "fcn_resnet50":
        from torchvision.models.segmentation import fcn_resnet50

        model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    else:
        raise KeyshardError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if weights:
        load_backbone(model, name, weights)
    return model


def load_backbone(model: nn.Module, name: str, path: str) -> None:
    """Initialise from a local file: a ResNet-50 state dict (into the FCN backbone), or a full
    state dict / keyshard checkpoint of the same model.  Anything else is one clear error."""
    from keyshard.train.checkpoint import load_file

    p = Path(path)
    state = load_file(p, "weights file")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a keyshard checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KeyshardError(f"{p}: does not hold a state dict of tensors")
    target = model
    if name == "fcn_resnet50" and not any(k.startswith("backbone.") for k in state):
        target = model.backbone  # torchvision resnet50 weights: only fc.* are left over
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError:  # same names, other shapes
        raise KeyshardError(f"{p}: weights do not fit model {name} (tensor shapes differ)") from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    loaded = len(state) - len(result.unexpected_keys)
    if unexpected or loaded == 0:
        raise KeyshardError(f"{p}: weights do not fit model {name} ({len(unexpected)} unexpected keys, "
                            f"{loaded} loaded)")


def build(name: str, *, num_classes: int, block_size: int | None = None, image_size: int | None = None,
          weights: str | None = None, aux_loss: bool = True) -> nn.Module:
    """The segmentation task's model factory (``keyshard/tasks/segmentation.py``: ``Task.model``),
    with the keywords every task's factory takes; ``image_size`` is not needed here."""
    return build_model(name, weights, aux_loss=aux_loss, block_size=block_size, num_classes=num_classes)
