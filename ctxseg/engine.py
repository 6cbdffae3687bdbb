"""The training and validation loop, in plain PyTorch (no Ray, no MLflow).

The Ray Train worker in ``pipeline/train.py`` and the benchmarks call these same functions, so a run
inside Ray and a run in a plain process execute identical steps. Distributed behaviour relies only on
``torch.distributed`` (initialised by whoever launches the ranks).

Schedules, as in both papers:

* learning rate, poly decay stepped per iteration: ``lr_t = (lr0 − lr_min)·(1 − t/T)^0.9 + lr_min``;
* ``progress = t/T`` is passed to the model every step; a context head derives its own schedules
  from it (MCIBI's Eq 7 memory momentum lives in the memory, independent of the learning rate).

The loop knows no loss names: the model returns ``"loss"`` (the objective) and any number of 0-dim
terms to log (``loss_o``, ``loss_w``, ``memory_momentum``, ...), and every one of them is logged by its
key. :func:`fit` owns the epoch loop; Ray, Tune and MLflow attach to it as :class:`Callback` objects
(in ``pipeline/``), so a run inside Ray and a run in a notebook execute identical steps.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ctxseg.config import TrainConfig
from ctxseg.inference import predict_probs
from ctxseg.metrics import ConfusionMatrix

log = logging.getLogger(__name__)

NOT_LOGGED = ("logits", "loss")  # model outputs that are not terms to log


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite. Training stops without a retry (a restart would meet it again)."""


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
    """Every generator that decides the future of a run: torch CPU, every CUDA device, numpy, python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    keys = np.asarray(state["numpy"], dtype=np.int64).astype(np.uint32)
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", keys, state["numpy_pos"], int(has_gauss), float(gauss)))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


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


def logged_terms(out: dict) -> list[str]:
    """Keys of a model's training output that are logged: ``loss`` and every other one-element tensor."""
    return ["loss", *(k for k, v in out.items() if k not in NOT_LOGGED and torch.is_tensor(v) and v.numel() == 1)]


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

    ``on_log`` receives, every ``cfg.log_every`` iterations, the mean over the interval of ``loss`` and
    of every 0-dim term the model returned (whatever its name), the learning rate and the global images/s.
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
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # One host synchronisation per step: the finiteness flag (agreed by every rank, so all stop
        # together and none hangs) and every logged value travel to the host in one transfer, after
        # the backward pass has been queued.
        names = logged_terms(out)
        values = torch.stack([out[k].detach().float().reshape(()) for k in names])
        flag = torch.isfinite(values[:1]).float()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        host = torch.cat([flag, values]).tolist()
        logged = dict(zip(names, host[1:]))
        if host[0] < 1:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in logged.items() if k != "loss")
            raise NonFiniteLossError(
                f"non-finite loss at iteration {state.iteration} (epoch {state.epoch + 1}): "
                f"loss={logged['loss']:.4g} ({shown}). Lower train.lr or check the data."
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.iteration += 1
        batch = images.shape[0] * world
        images_seen += batch
        epoch_images += batch
        for k, v in logged.items():
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
                       extra: Optional[dict] = None, *, scaler: Optional[torch.amp.GradScaler] = None,
                       rng_per_rank: Optional[list] = None) -> dict:
    """Everything that decides the future of a run: weights (the MCIBI memory buffer included), the
    optimiser, the AMP scaler, the iteration and every random generator — of each rank when
    ``rng_per_rank`` is given (see :func:`gather_rng_states`). The data order needs no state
    (:class:`ctxseg.loaders.EpochShuffleSampler`)."""
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        **(extra or {}),
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if rng_per_rank is not None:
        payload["rng_per_rank"] = rng_per_rank
    return payload


def gather_rng_states() -> Optional[list]:
    """Every rank's :func:`rng_state`, gathered on all ranks (None without a process group)."""
    rank, world = _world()
    if world == 1:
        return None
    states: list = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def restore_from_payload(payload: dict, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                         scaler: Optional[torch.amp.GradScaler] = None) -> TrainState:
    """Load a :func:`checkpoint_payload` into live objects; this rank's generators are restored too."""
    unwrap(model).load_state_dict(payload["model"])
    if optimizer is not None and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and "scaler" in payload:
        scaler.load_state_dict(payload["scaler"])
    rank, world = _world()
    per_rank = payload.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world:
        restore_rng_state(per_rank[rank])
    elif "rng" in payload:
        restore_rng_state(payload["rng"])
    return TrainState(**payload["state"])


def replicated_spread(model: torch.nn.Module) -> dict[str, float]:
    """``{"<name>_rank_spread": max |a - b|}`` over ranks for every buffer the model says must be
    identical on all ranks (``model.replicated_buffers()``, e.g. MCIBI's memory); 0 on one process."""
    buffers = getattr(unwrap(model), "replicated_buffers", lambda: {})()
    _, world = _world()
    spreads = {}
    for name, buffer in buffers.items():
        value = buffer.detach().float()
        if world > 1:
            high, low = value.clone(), value.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            spreads[f"{name}_rank_spread"] = float((high - low).abs().max())
        else:
            spreads[f"{name}_rank_spread"] = 0.0
    return spreads


class Callback:
    """Hooks into :func:`fit`. Every rank calls every hook; a callback decides what its rank does."""

    def on_fit_start(self, run: "FitRun") -> None:
        pass

    def on_iteration_start(self, run: "FitRun", iteration: int) -> None:
        pass

    def on_log(self, run: "FitRun", record: dict) -> None:
        """Every ``train.log_every`` iterations: interval means of the logged terms, lr, images/s."""

    def on_epoch_end(self, run: "FitRun", metrics: dict) -> None:
        """After an epoch (and its validation); ``metrics`` is also appended to ``run.state.history``."""

    def on_fit_end(self, run: "FitRun", error: Optional[BaseException]) -> None:
        """Always called, with the exception that ended training if any."""


@dataclasses.dataclass
class FitRun:
    """What the callbacks of one :func:`fit` see."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    cfg: TrainConfig
    total_iterations: int
    rank: int
    world: int
    scaler: Optional[torch.amp.GradScaler] = None

    def checkpoint(self) -> dict:
        """The checkpoint payload of this moment (call it on every rank: it gathers their RNG states)."""
        return checkpoint_payload(self.model, self.optimizer, self.state, scaler=self.scaler,
                                  rng_per_rank=gather_rng_states())


def fit(model: torch.nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, cfg: TrainConfig, *,
        num_classes: int, state: Optional[TrainState] = None, callbacks: Sequence[Callback] = (),
        device: torch.device = torch.device("cpu"), amp_dtype: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None, epoch_metrics: Optional[dict] = None) -> TrainState:
    """Train from ``state`` (a fresh run, or a restored checkpoint) to ``cfg.epochs``.

    Each epoch: the loader is told the epoch (:func:`ctxseg.loaders.set_epoch`), one pass of
    :func:`train_one_epoch`, validation every ``cfg.val_every`` epochs and at the last, the spread of
    every replicated buffer over ranks, then ``on_epoch_end`` with the epoch's metrics (plus
    ``epoch_metrics``, e.g. the node count). A :class:`NonFiniteLossError` propagates after
    ``on_fit_end`` has seen it.
    """
    from ctxseg.loaders import set_epoch

    rank, world = _world()
    state = state if state is not None else TrainState()
    total = cfg.epochs * len(train_loader)
    run = FitRun(model, optimizer, state, cfg, total, rank, world, scaler)
    for cb in callbacks:
        cb.on_fit_start(run)
    error: Optional[BaseException] = None
    try:
        for epoch in range(state.epoch, cfg.epochs):
            set_epoch(train_loader, epoch)
            summary = train_one_epoch(
                model, train_loader, optimizer, state, cfg, total, device=device, amp_dtype=amp_dtype,
                scaler=scaler, on_log=lambda record: [cb.on_log(run, record) for cb in callbacks],
                on_iteration=lambda it: [cb.on_iteration_start(run, it) for cb in callbacks],
            )
            state.epoch = epoch + 1
            metrics: dict[str, Any] = {"epoch": state.epoch, "iteration": state.iteration}
            metrics.update({f"train_{k}": v for k, v in summary.items()})
            if state.epoch % cfg.val_every == 0 or state.epoch == cfg.epochs:
                started = time.perf_counter()
                val = validate(model, val_loader, num_classes, device=device)
                metrics.update({"val_mIoU": val["mIoU"], "val_pixAcc": val["pixAcc"], "val_mAcc": val["mAcc"],
                                "val_seconds": time.perf_counter() - started})
            metrics.update(replicated_spread(model))
            metrics.update(epoch_metrics or {})
            state.history.append(metrics)
            for cb in callbacks:
                cb.on_epoch_end(run, metrics)
    except BaseException as err:
        error = err
        raise
    finally:
        for cb in callbacks:
            cb.on_fit_end(run, error)
    return state


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
