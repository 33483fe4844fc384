"""Classification models (the transfer-learning paper's setting): torchvision ResNet-18 and a
small ViT-style model whose patch embedding sees whole key blocks.

Both return ``{"out": logits N×K}`` like the segmentation models, so ``train_step`` and the
holdout loss serve both tasks (a class index is a one-"pixel" label).  Nothing is downloaded:
``--weights`` names a local file (a torchvision ResNet-18 state dict, or a keyshard checkpoint /
state dict of the same model, e.g. one trained on plain images to fine-tune on keyed ones).

``PatchViT``'s patch embedding is ``stem``: one convolution with kernel = stride = S, S the
smallest multiple of the key's block size M that is ≥ 4 (``models.stem_stride``), exactly the
block-aligned segmentation stem — so ``keyshard protect`` folds an SHF/NP key into it with the
same function (``train/protect.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keyshard.errors import KeyshardError
from keyshard.train.models import stem_stride
from keyshard.train.presets import CLASSIFIERS


class PatchViT(nn.Module):
    """Patch embedding (``stem``, kernel = stride = S) → pre-norm transformer → mean pool → head."""

    def __init__(self, block_size: int, num_classes: int, image_size: int, dim: int = 64, depth: int = 3,
                 heads: int = 4, mlp: int = 2):
        super().__init__()
        s = stem_stride(block_size)
        if image_size % s:
            raise KeyshardError(f"patch size {s} (block size {block_size}) does not divide the image size {image_size}")
        self.block_size, self.stride, self.image_size = block_size, s, image_size
        self.stem = nn.Conv2d(3, dim, kernel_size=s, stride=s)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // s) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        y = self.norm(self.encoder(tokens)).mean(dim=1)
        return {"out": self.head(y)}


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    class ResNet18(ResNet):
        """torchvision's ResNet-18 (same state-dict names), returning ``{"out": logits}``."""

        def forward(self, x):
            return {"out": super().forward(x)}

    return ResNet18(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


HEADS = {"patch_vit": "head.", "resnet18": "fc."}


def build_classifier(name: str, num_classes: int, block_size: int | None = None, image_size: int | None = None,
                     weights: str | None = None) -> nn.Module:
    if name == "resnet18":
        model = _resnet18(num_classes)
    elif name == "patch_vit":
        if not block_size:
            raise KeyshardError("the patch_vit model needs a block size (`block_size`, on plain shards)")
        model = PatchViT(block_size, num_classes, image_size)
    else:
        raise KeyshardError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")
    if weights:
        load_weights(model, name, weights)
    return model


def load_weights(model: nn.Module, name: str, path: str) -> None:
    """Initialise from a local file; the classification head is kept only where its shape fits
    (another class count: a fresh head, the transfer-learning case)."""
    from keyshard.train.checkpoint import load_file

    p = Path(path)
    state = load_file(p, "weights file")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KeyshardError(f"{p}: does not hold a state dict of tensors")
    own = model.state_dict()
    head = HEADS[name]
    fitting = {k: v for k, v in state.items()
               if k in own and (tuple(v.shape) == tuple(own[k].shape) or not k.startswith(head))}
    bad = [k for k, v in fitting.items() if tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    body = [k for k in own if not k.startswith(head)]
    missing = [k for k in body if k not in fitting]
    if bad or unexpected or missing:
        first = (bad or missing or unexpected)[0]
        raise KeyshardError(f"{p}: weights do not fit model {name} ({len(bad)} of another shape, {len(missing)} "
                            f"missing, {len(unexpected)} unexpected, e.g. {first[:80]!r})")
    model.load_state_dict(fitting, strict=False)


def build(name: str, *, num_classes: int, block_size: int | None = None, image_size: int | None = None,
          weights: str | None = None, aux_loss: bool = True) -> nn.Module:
    """The classification task's model factory (``keyshard/tasks/classification.py``:
    ``Task.model``), with the keywords every task's factory takes; classifiers have no auxiliary head."""
    return build_classifier(name, num_classes, block_size, image_size, weights)
