"""The model names and training presets (``keyshard train --model/--preset``), defined once: the
model factories, checkpoints and the trainer check against them, and the CLI's choices and help
quote them, so help cannot drift from the code.  Plain data, no torch import (the CLI reads this
module to format ``--help``)."""

from __future__ import annotations

SEGMENTATION_MODELS = ("fcn_resnet50", "small", "block_aligned")  # train/models.py builds them
CLASSIFIERS = ("patch_vit", "resnet18")  # train/classifiers.py builds them
BLOCK_MODELS = ("block_aligned", "patch_vit")  # stems built for one block size M (model_block_size)
CLASSIFY_MODELS = {"demo": "patch_vit", "paper": "resnet18"}  # the presets' classifiers
PRESETS = {
    # Section 3.1 of the paper.
    # Plain FCN with cross-entropy (no auxiliary loss: --aux-weight adds torchvision's), global batch 256.
    "paper": dict(model="fcn_resnet50", epochs=100, batch_size=256, micro_batch=32, lr=0.1, momentum=0.9,
                  weight_decay=0.005, restart_epochs=10, min_lr=1e-4, aux_weight=0.0),
    # Small network, CPU, minutes on the toy data.
    "demo": dict(model="small", epochs=12, batch_size=16, micro_batch=16, lr=0.05, momentum=0.9,
                 weight_decay=1e-4, restart_epochs=12, min_lr=1e-4, aux_weight=0.0),
}

# --batch-size B without --micro-batch: each rank's micro-batch is min(B, cap) (None: B)
MICRO_BATCH_CAPS = {"paper": 32, "demo": None}


def micro_batch_for(preset: str, batch_size: int) -> int:
    """The micro-batch ``train --batch-size`` implies when --micro-batch is not given."""
    cap = MICRO_BATCH_CAPS[preset]
    return batch_size if cap is None else min(batch_size, cap)


def micro_batch_rule() -> str:
    """``"min(B, 32) with --preset paper, B with --preset demo"``: ``micro_batch_for`` for --help."""
    return ", ".join(f"{'B' if cap is None else f'min(B, {cap})'} with --preset {name}"
                     for name, cap in MICRO_BATCH_CAPS.items())


def by_preset(setting: str) -> str:
    """``"100 with --preset paper, 12 with --preset demo"`` (or ``"0.9 with every preset"``)."""
    text = {name: (f"{v:g}" if isinstance(v := values[setting], float) else str(v)) for name, values in PRESETS.items()}
    if len(set(text.values())) == 1:
        return f"{next(iter(text.values()))} with every preset"
    return ", ".join(f"{v} with --preset {name}" for name, v in text.items())
