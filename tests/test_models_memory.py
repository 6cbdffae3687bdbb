"""MCIBI feature memory: Eq 7 schedule, Eq 8 upsampling, Eq 9-10 update vs a per-pixel loop, inits,
RCL leaves BN statistics alone, and the exact DDP update (two gloo processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctxseg.models import build_segmentor
from ctxseg.models.memory import FeatureMemory, interp_matrix, poly_momentum

K, C = 5, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- Eq 7
def test_eq7_poly_momentum():
    # MCIBI Eq 7: m_t = (1 - t/T)^p (m0 - m0/100) + m0/100; the floor m0/100 is reached at t = T
    assert poly_momentum(0.0, 0.9, 0.9) == pytest.approx(0.9)
    assert poly_momentum(0.5, 0.9, 0.9) == pytest.approx(0.5 ** 0.9 * (0.9 - 0.009) + 0.009)
    assert poly_momentum(1.0, 0.9, 0.9) == pytest.approx(0.009) and poly_momentum(1.0, 0.9, 0.9) > 0
    assert poly_momentum(1.7, 0.9, 0.9) == pytest.approx(0.009) and poly_momentum(-1, 0.9, 0.9) == pytest.approx(0.9)


def test_eq7_through_training_forward():
    model = build_segmentor({"context": "mcibi", "channels": 8, "mcibi": {"momentum": 0.8, "momentum_power": 2.0}},
                            3).train()
    x, y = torch.randn(1, 3, 32, 32), torch.randint(0, 3, (1, 32, 32))
    for t, expected in [(0.0, 0.8), (0.5, 0.25 * (0.8 - 0.008) + 0.008), (1.0, 0.008)]:
        out = model(x, y, t)
        assert float(out["memory_momentum"]) == pytest.approx(expected)


# ---------------------------------------------------------------- Eq 8
@pytest.mark.parametrize("out_size, in_size", [(13, 5), (16, 4), (7, 7), (5, 9), (31, 4)])
def test_interp_matrix_matches_bilinear(out_size, in_size):
    x = torch.randn(2, 3, in_size, in_size + 2)
    ref = F.interpolate(x, size=(out_size, out_size + 3), mode="bilinear", align_corners=False)
    ah, aw = interp_matrix(out_size, in_size), interp_matrix(out_size + 3, in_size + 2)
    ours = torch.einsum("oh,bchw,pw->bcop", ah, x, aw)
    assert torch.allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------- Eq 9-10 / Eq 6 vs per-pixel loop
def reference_update(memory, initialized, feats, labels, momentum, strategy, ignore=255):
    """Slow reference: upsample with F.interpolate, then loop over pixels (Eq 6, 8-10)."""
    up = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    mem = memory.clone()
    num = torch.zeros_like(mem, dtype=torch.float64)
    den = torch.zeros(mem.shape[0], dtype=torch.float64)
    cnt = torch.zeros(mem.shape[0], dtype=torch.float64)
    tot = torch.zeros_like(num)
    b, _, h, w = up.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                k = int(labels[i, y, x])
                if k == ignore or k >= mem.shape[0]:
                    continue
                r = up[i, :, y, x].double()
                m = memory[k].double()
                cos = float(torch.dot(r, m) / (r.norm() * m.norm()))
                num[k] += (1 - cos) * r  # Eq 9 numerator weight (1 - cos)
                den[k] += 1 - cos
                cnt[k] += 1
                tot[k] += r
    for k in range(mem.shape[0]):
        if cnt[k] == 0 or not initialized[k]:
            continue
        target = num[k] / den[k] if strategy == "cosine" else tot[k] / cnt[k]  # Eq 10
        mem[k] = ((1 - momentum) * memory[k].double() + momentum * target).float()  # Eq 6
    return mem


@pytest.mark.parametrize("strategy", ["cosine", "mean"])
@pytest.mark.parametrize("chunk", [7, 150, 1 << 18])
def test_eq9_10_update_matches_pixel_loop(strategy, chunk):
    mem = FeatureMemory(K, C, init="mean", update=strategy, chunk_pixels=chunk)
    mem.memory.copy_(torch.randn(K, C))
    mem.initialized[:] = True
    mem.initialized[4] = False  # an uninitialised class present in the batch is initialised, not updated
    feats = torch.randn(2, C, 5, 7)
    labels = torch.randint(0, K - 1, (2, 11, 13))
    labels[0, :2] = 255
    labels[1, 0, :4] = 4
    labels[labels == 2] = 0  # class 2 absent: its row must not move
    before = mem.memory.clone()
    ref = reference_update(before, mem.initialized.clone(), feats, labels, 0.3, strategy)
    stats = mem.update(feats, labels, 0.3)
    assert stats == {"initialised": 1, "updated": 3}
    assert torch.allclose(mem.memory[:4], ref[:4], atol=1e-5)
    assert torch.equal(mem.memory[2], before[2])
    up = F.interpolate(feats, size=(11, 13), mode="bilinear", align_corners=False)
    mean4 = up.permute(0, 2, 3, 1)[labels == 4].mean(0)
    assert torch.allclose(mem.memory[4], mean4, atol=1e-5)  # 'mean' init of class 4
    assert bool(mem.initialized.all())


def test_update_momentum_zero_keeps_memory_and_one_replaces():
    mem = FeatureMemory(K, C, init="mean", update="mean")
    mem.memory.copy_(torch.randn(K, C))
    mem.initialized[:] = True
    feats, labels = torch.randn(1, C, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    before = mem.memory.clone()
    mem.update(feats, labels, 0.0)
    assert torch.equal(mem.memory, before)
    mem.update(feats, labels, 1.0)
    assert torch.allclose(mem.memory[0], feats[0].flatten(1).mean(1), atol=1e-6)


def test_random_init_picks_one_pixel_of_the_class():
    mem = FeatureMemory(K, C, init="random")
    feats = torch.randn(2, C, 6, 6)
    labels = torch.randint(0, 3, (2, 6, 6))
    mem.update(feats, labels, 0.9)
    assert mem.initialized.tolist() == [True, True, True, False, False]
    pix = feats.permute(0, 2, 3, 1)
    for k in range(3):
        candidates = pix[labels == k]
        assert (candidates - mem.memory[k]).abs().amax(1).min() < 1e-6, "row is one of the class's pixels"
    assert torch.equal(mem.memory[3:], torch.zeros(2, C))


def test_clustering_init_takes_the_largest_cluster():
    mem = FeatureMemory(2, 3, init="clustering")
    big = torch.tensor([5.0, 0.0, 0.0]) + 0.05 * torch.randn(70, 3)
    small = torch.tensor([-5.0, 3.0, 0.0]) + 0.05 * torch.randn(30, 3)
    pix = torch.cat([big, small])[torch.randperm(100)]
    feats = pix.t().reshape(1, 3, 10, 10)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    mem.update(feats, labels, 0.9)
    assert torch.allclose(mem.memory[0], big.mean(0), atol=1e-4)
    assert not bool(mem.initialized[1])


# ---------------------------------------------------------------- RCL and BN statistics
def test_rcl_does_not_touch_bn_running_stats_but_trains_h2():
    model = build_segmentor({"context": "mcibi", "channels": 8, "dropout": 0.0}, 3).train()
    head = model.decode_head
    head.memory.memory.copy_(torch.randn(3, 8) * 5 + 3)
    head.memory.initialized[:] = True
    bn = head.classifier[0][1]
    mean, var, n = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    loss = head.memory_loss()
    loss.backward()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == n
    assert head.classifier[0][0].weight.grad.abs().sum() > 0 and bn.weight.grad.abs().sum() > 0
    # reference: H2 in eval mode on the memory rows, cross entropy against the class ids
    head.classifier.eval()
    ref = F.cross_entropy(head.classifier(head.memory.memory[:, :, None, None]).flatten(1), torch.arange(3))
    assert torch.allclose(loss, ref, atol=1e-6)


# ---------------------------------------------------------------- DDP: exact union update
# two gloo processes, file:// rendezvous in a private temp dir (no port races with other runs)
def _batches():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, C, 4, 5, generator=g) for _ in range(4)]  # [rank0 step0, rank1 step0, r0 s1, r1 s1]
    labels = [torch.randint(0, 3, (2, 9, 11), generator=g) for _ in range(4)]
    labels[1][0, :3] = 3  # class 3 only on rank 1 in step 0
    labels[3][1, 2:] = 4  # class 4 only on rank 1 in step 1
    labels[2][:, 0] = 255
    return feats, labels


def _steps(rank_batches, mem):
    for step, (f, l) in enumerate(rank_batches):
        mem.update(f, l, poly_momentum(step / 2, 0.9, 0.9))


def _ddp_worker(rank, world, init_method, out_dir):
    """Both DDP scenarios in one spawn (process start-up dominates the cost on 2 shared cores)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        feats, labels = _batches()
        for init in ["mean", "random"]:
            torch.manual_seed(100 + rank)  # different random streams per rank
            mem = FeatureMemory(K, C, init=init, update="cosine")
            _steps([(feats[rank], labels[rank]), (feats[2 + rank], labels[2 + rank])], mem)
            torch.save({"memory": mem.memory, "initialized": mem.initialized},
                       os.path.join(out_dir, f"{init}{rank}.pt"))
        # a DDP-wrapped segmentor trained two steps on different data per rank
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = build_segmentor({"context": "mcibi", "channels": 8, "backbone": {"width": 4}}, 3)
        # (SyncBatchNorm needs GPU modules under DDP; plain BN on CPU)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        torch.manual_seed(10 + rank)
        for step in range(2):
            x, y = torch.randn(2, 3, 24, 24), torch.randint(0, 3, (2, 24, 24))
            out = ddp(x, y, step / 2)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        torch.save(model.memory.memory, os.path.join(out_dir, f"model{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, f"file://{out / 'rdzv'}", str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("init", ["mean", "random"])
def test_ddp_two_ranks_equal_single_process_on_union(ddp_results, init):
    r0 = torch.load(ddp_results / f"{init}0.pt", weights_only=True)
    r1 = torch.load(ddp_results / f"{init}1.pt", weights_only=True)
    assert torch.equal(r0["memory"], r1["memory"]), "memories must be identical on every rank"
    assert torch.equal(r0["initialized"], r1["initialized"])
    assert r0["initialized"].tolist() == [True, True, True, True, True]
    if init == "random":  # one pixel of the union batch per class, the same one on both ranks
        return
    feats, labels = _batches()
    single = FeatureMemory(K, C, init="mean", update="cosine")
    _steps([(torch.cat(feats[0:2]), torch.cat(labels[0:2])), (torch.cat(feats[2:4]), torch.cat(labels[2:4]))], single)
    assert torch.allclose(r0["memory"], single.memory, atol=1e-5)
    # the reference implementation's average of per-rank updated memories would differ
    naive = []
    for rank in range(2):
        m = FeatureMemory(K, C, init="mean", update="cosine")
        _steps([(feats[rank], labels[rank]), (feats[2 + rank], labels[2 + rank])], m)
        naive.append(m.memory)
    assert not torch.allclose((naive[0] + naive[1]) / 2, single.memory, atol=1e-3)


def test_ddp_wrapped_segmentor_keeps_memories_identical(ddp_results):
    m0 = torch.load(ddp_results / "model0.pt", weights_only=True)
    m1 = torch.load(ddp_results / "model1.pt", weights_only=True)
    assert torch.equal(m0, m1) and m0.abs().sum() > 0 and bool(torch.isfinite(m0).all())
