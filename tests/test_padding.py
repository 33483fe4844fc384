"""Padding that changes nothing, checked with 2 gloo ranks under DistributedDataParallel.

* a global step that is all padding leaves parameters, BatchNorm buffers and optimizer state
  bit-identical;
* k real + p padded rows give the same parameters, BatchNorm buffers and optimizer state as the
  k real rows alone;
* the update is the gradient of the summed loss over every rank's valid pixels divided by the
  global valid-pixel count.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from keyshard.shardformat import VOID
from keyshard.train.models import build_model
from keyshard.train.step import segmentation_loss, train_step
from keyshard.transforms import normalize_pixels

SIZE = 16


def _batch(rank: int, n: int, seed: int):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    pixels = torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 21, (n, SIZE, SIZE), generator=g, dtype=torch.uint8)
    masks[:, :2] = VOID  # some void pixels in the real rows too
    return pixels, masks


def _pad(pixels, masks, p: int):
    return (torch.cat([pixels, torch.zeros((p, *pixels.shape[1:]), dtype=pixels.dtype)]),
            torch.cat([masks, torch.full((p, *masks.shape[1:]), VOID, dtype=masks.dtype)]))


def _state(model, opt):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            copy.deepcopy(opt.state_dict()["state"]))


def _same(a, b, exact=True):
    def eq(x, y):
        return torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-6, rtol=1e-5)

    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(eq(ma[k], mb[k]) for k in ma)
    assert oa.keys() == ob.keys()
    for i in oa:
        assert all(eq(oa[i][k], ob[i][k]) for k in oa[i])


def _setup(seed=0, wrap=True):
    torch.manual_seed(seed)
    model = build_model("small")
    ddp = DDP(model) if wrap else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    forward = lambda px: ddp(normalize_pixels(px, 255))  # noqa: E731
    return model, ddp, opt, scaler, forward


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, ddp, opt, scaler, forward = _setup()
    # one real step first, so momentum buffers exist and a wrong step would change them
    px, mk = _batch(rank, 4, seed=1)
    train_step(ddp, opt, scaler, forward, px, mk, 0, 4, world)
    before = _state(model, opt)

    # (1) every rank all padding: nothing moves
    px, mk = _pad(*_batch(rank, 0, seed=2), 4)
    loss, valid = train_step(ddp, opt, scaler, forward, px, mk, 4, 2, world)
    assert (loss, valid) == (0.0, 0.0)
    _same(_state(model, opt), before)

    # (2) k real + p padded == the k real rows alone (rank 0: 3 + 1, rank 1: 1 + 3)
    k = 3 if rank == 0 else 1
    real = _batch(rank, k, seed=3)
    train_step(ddp, opt, scaler, forward, *_pad(*real, 4 - k), 4 - k, 4, world)
    padded = _state(model, opt)
    model.load_state_dict(before[0])
    opt.load_state_dict({"state": copy.deepcopy(before[1]), "param_groups": opt.state_dict()["param_groups"]})
    train_step(ddp, opt, scaler, forward, *real, 0, 4, world)
    _same(_state(model, opt), padded)

    # (3) the update is grad(sum of every rank's loss) / global valid count; a rank whose second
    # micro-batch is all padding still keeps DDP in step (rank 1: 2 real + 2 padded, micro 2)
    model.load_state_dict(before[0])
    plain_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    k = 4 if rank == 0 else 2
    real = _batch(rank, k, seed=4)
    reference = copy.deepcopy(model)
    total = 0.0
    for i in range(0, k, 2):  # the same micro-batches on a plain copy: BatchNorm is per rank anyway
        out = reference(normalize_pixels(real[0][i:i + 2], 255))
        segmentation_loss(out, real[1][i:i + 2].long(), 0.0).backward()
        total += float((real[1][i:i + 2] != VOID).sum())
    total_t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(total_t)
    grads = [p.grad.clone() for p in reference.parameters()]
    for g in grads:
        dist.all_reduce(g)
    start = [p.detach().clone() for p in model.parameters()]
    _, valid = train_step(ddp, plain_opt, scaler, forward, *_pad(*real, 4 - k), 4 - k, 2, world)
    assert valid == float(total_t[0])
    for p0, p1, g in zip(start, model.parameters(), grads):
        assert torch.allclose(p0 - p1, g / valid, atol=1e-6, rtol=1e-4)
    dist.destroy_process_group()


def test_padding_changes_nothing_with_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True, start_method="spawn")


def test_single_process_padding_is_the_real_rows_alone():
    model, _, opt, scaler, forward = _setup(seed=5, wrap=False)
    before = _state(model, opt)
    real = _batch(0, 3, seed=6)
    loss_padded, valid = train_step(model, opt, scaler, forward, *_pad(*real, 5), 5, 4, 1)
    padded = _state(model, opt)
    model.load_state_dict(before[0])
    opt.load_state_dict({"state": copy.deepcopy(before[1]), "param_groups": opt.state_dict()["param_groups"]})
    loss_real, valid_real = train_step(model, opt, scaler, forward, *real, 0, 4, 1)
    assert (loss_padded, valid) == pytest.approx((loss_real, valid_real))
    _same(_state(model, opt), padded)
