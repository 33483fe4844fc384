"""The one place that decides where tensors live: the GPU when there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(local_rank: int = 0) -> torch.device:
    """CUDA device ``local_rank`` (torchrun's LOCAL_RANK) when CUDA is present, else the CPU."""
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend matching ``pick_device``: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() else "gloo"
