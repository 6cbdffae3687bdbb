"""The training and validation loop, in plain PyTorch (no Ray, no MLflow).

The Ray Train worker in ``pipeline/train.py`` and the benchmarks call these same functions, so a run
inside Ray and a run in a plain process execute identical steps. Distributed behaviour relies only on
``torch.distributed`` (initialised by whoever launches the ranks).

Schedules, as in both papers:

* learning rate, poly decay stepped per iteration: ``lr_t = (lr0 − lr_min)·(1 − t/T)^0.9 + lr_min``;
* MCIBI memory momentum, Eq 7, driven by ``progress = t/T`` that the loop passes to the model
  (independent of the learning rate).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ctxseg.config import TrainConfig
from ctxseg.inference import predict_probs
from ctxseg.metrics import ConfusionMatrix

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss_o", "loss_aux", "loss_w", "loss_m")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite. Training stops; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # optimiser steps completed
    history: list[dict] = dataclasses.field(default_factory=list)  # one entry per completed epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.asarray(state["numpy"], dtype=np.int64).astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    import ast

    random.setstate(ast.literal_eval(state["python"]))


def poly_lr(base_lr: float, min_lr: float, iteration: int, total: int, power: float) -> float:
    """Poly learning-rate decay, stepped per iteration."""
    progress = min(iteration / max(total, 1), 1.0)
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (none on BatchNorm weights and biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (so all ranks stop together, none hangs)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    rank, world = _world()
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    total_iterations: int,
    *,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    on_log: Optional[Callable[[dict], None]] = None,
    on_iteration: Optional[Callable[[int], None]] = None,
) -> dict:
    """Run one epoch of optimiser steps; return the epoch's mean loss terms and throughput.

    ``on_log`` receives, every ``cfg.log_every`` iterations, the mean of each loss term over the
    interval, the learning rate, the memory momentum (MCIBI) and the global images/s.
    ``on_iteration(iteration)`` runs before every step (used for fault injection in tests).
    """
    _, world = _world()
    model.train()
    sums: dict[str, float] = {}
    count = 0
    epoch_sums: dict[str, float] = {}
    epoch_count = 0
    images_seen = 0
    epoch_images = 0
    interval_start = epoch_start = time.perf_counter()
    for images, targets in loader:
        if on_iteration is not None:
            on_iteration(state.iteration)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        lr = poly_lr(cfg.lr, cfg.min_lr, state.iteration, total_iterations, cfg.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        progress = state.iteration / max(total_iterations, 1)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images, targets, progress)
        loss = out["loss"]
        if not _all_finite(loss):
            terms = {k: float(out[k]) for k in LOSS_TERMS if k in out}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            raise NonFiniteLossError(
                f"non-finite loss at iteration {state.iteration} (epoch {state.epoch + 1}): "
                f"loss={float(loss.detach()):.4g} ({shown}). Lower train.lr or check the data; "
                f"the last good checkpoint is kept."
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        state.iteration += 1
        batch = images.shape[0] * world
        images_seen += batch
        epoch_images += batch
        values = {"loss": float(loss.detach())}
        for k in LOSS_TERMS + ("memory_momentum",):
            if k in out:
                values[k] = float(out[k])
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
            epoch_sums[k] = epoch_sums.get(k, 0.0) + v
        count += 1
        epoch_count += 1
        if on_log is not None and (state.iteration % cfg.log_every == 0):
            now = time.perf_counter()
            record = {k: v / count for k, v in sums.items()}
            record["lr"] = lr
            record["images_per_s"] = images_seen / max(now - interval_start, 1e-9)
            on_log(record)
            sums, count, images_seen, interval_start = {}, 0, 0, now
    elapsed = time.perf_counter() - epoch_start
    summary = {k: v / max(epoch_count, 1) for k, v in epoch_sums.items()}
    summary["images_per_s"] = epoch_images / max(elapsed, 1e-9)
    summary["epoch_seconds"] = elapsed
    return summary


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device = torch.device("cpu"),
    ignore_index: int = 255,
    **inference: Any,
) -> dict:
    """Confusion-matrix metrics over ``loader`` (summed over ranks when distributed).

    ``inference`` is passed to :func:`ctxseg.inference.predict_probs` (mode, crop_size, stride,
    scales, flip); the default is single-scale whole-image inference.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    for images, targets in loader:
        images = images.to(device)
        targets = targets.to(device)
        probs = predict_probs(model, images, **inference)
        cm.update(probs.argmax(1), targets)
    cm.all_reduce()
    model.train(was_training)
    return cm.compute()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare segmentor inside a DistributedDataParallel wrapper (if any)."""
    return model.module if hasattr(model, "module") else model


def checkpoint_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                       extra: Optional[dict] = None) -> dict:
    """Everything needed to resume exactly: weights (incl. the MCIBI memory buffer), optimiser, RNG."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        **(extra or {}),
    }


def restore_from_payload(payload: dict, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> TrainState:
    unwrap(model).load_state_dict(payload["model"])
    if optimizer is not None and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    if "rng" in payload:
        restore_rng_state(payload["rng"])
    return TrainState(**payload["state"])


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
