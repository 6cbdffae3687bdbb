"""Group 3 - where the time of one training step goes (CPU, 512 x 512, batch 1).

Models: the default ``ModelConfig()`` (FCN, resnet_tiny, 64 channels), the default study's
``fcn_mcibi``, and ResNet-50 DeepLabV3+MCIBI (512 channels, as MCIBI). One step is decomposed into
parts that are timed separately in the same process, interleaved over rounds (medians):

* backbone: forward + backward of the backbone alone (a fixed random gradient on its outputs);
* context head: aux head + decode head (A_wi, DCA/ACF, fusion, classifiers) forward + backward on
  detached backbone features, minus the loss part;
* loss: the loss terms (upsampling + CE, L_W, RCL) forward + backward on detached logits;
* memory update: the head's ``on_step`` state update (MCIBI: ``FeatureMemory.update``, Eq 6-10;
  nothing for the other heads);
* optimiser step: ``optimizer.step()`` (SGD, momentum, weight decay) with gradients present.

The shares are of the sum of the parts; ``full_step_s`` is an engine-identical whole step
(``model(images, targets, progress)``, backward, step) measured in the same rounds, and
``parts/full`` checks that the parts add up.
"""
from __future__ import annotations

import time
from typing import List

from bench import median, target


def _models(quick: bool):
    from ctxseg.models import ModelConfig

    out = [("default fcn (resnet_tiny)", ModelConfig(), 19),
           ("fcn_mcibi (default study)", ModelConfig(context="mcibi"), 19)]
    if quick:
        out.append(("deeplabv3_mcibi (resnet_tiny in --quick)",
                    ModelConfig(framework="deeplabv3", context="mcibi", channels=64,
                                backbone={"name": "resnet_tiny"}), 19))
    else:
        out.append(("deeplabv3_mcibi resnet50 C=512",
                    ModelConfig(framework="deeplabv3", context="mcibi", channels=512,
                                backbone={"name": "resnet50"}), 19))
    return out


def _breakdown(name, cfg, num_classes, size, rounds):
    import torch

    from ctxseg.config import TrainConfig
    from ctxseg.engine import build_optimizer
    from ctxseg.models import build_segmentor
    from ctxseg.models.losses import segmentation_ce
    from ctxseg.models.segmentor import within_image

    torch.manual_seed(0)
    model = build_segmentor(cfg, num_classes)
    model.train()
    opt = build_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, size, size, generator=g)
    blocks = torch.randint(0, num_classes, (1, 1, size // 32, size // 32), generator=g).float()
    targets = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].long()
    head = model.decode_head

    def decode(feats, aux):
        """The head's outputs (logits + intermediates) after A_wi, as in ``Segmentor.forward``."""
        return head(feats[3], within_image(model.context_module, feats[3], aux))

    def head_loss(head_out, aux):
        up = torch.nn.functional.interpolate(head_out["logits"], size=(size, size), mode="bilinear",
                                             align_corners=False)
        loss = segmentation_ce(up, targets) + 0.4 * segmentation_ce(aux, targets)
        for term in head.losses(head_out, targets, 0.5).values():  # e.g. L_W, L_M (Eq 16-17)
            loss = loss + term.weight * term.value
        return loss

    # warm the head's state (MCIBI: initialise every class of the memory once)
    with torch.no_grad():
        feats = model.backbone(images)
        head.on_step(decode(feats, model.aux_head(feats[2])), targets, 0.0)

    def full():
        out = model(images, targets, 0.5)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def backbone():
        feats = model.backbone(images)
        loss = sum((f * torch.randn_like(f)).sum() for f in feats)
        loss.backward()

    state = {}

    def head_with_loss():
        with torch.no_grad():
            feats = model.backbone(images)
        feats[2].requires_grad_(), feats[3].requires_grad_()
        aux = model.aux_head(feats[2])
        head_out = decode(feats, aux)
        head_loss(head_out, aux).backward()

    def mem_update():
        head.on_step(state["out"], targets, 0.5)  # the head's state update (MCIBI: Eq 6-10)

    def opt_step():
        opt.step()

    times = {k: [] for k in ("full", "backbone", "head+loss", "loss", "memory update", "optimiser step")}
    for rnd in range(rounds + 1):  # round 0 is a warm-up
        rec = {}
        t = time.perf_counter(); full(); rec["full"] = time.perf_counter() - t
        t = time.perf_counter(); backbone(); rec["backbone"] = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter(); head_with_loss(); rec["head+loss"] = time.perf_counter() - t
        t = time.perf_counter(); opt_step(); rec["optimiser step"] = time.perf_counter() - t
        # loss part: forward of the loss terms + their backward into the logits (no backbone/head work)
        with torch.no_grad():
            feats = model.backbone(images)
            aux0 = model.aux_head(feats[2])
            out0 = decode(feats, aux0)
        t = time.perf_counter()
        detached = {k: v.clone().requires_grad_() for k, v in out0.items()}
        head_loss(detached, aux0.clone().requires_grad_()).backward()
        rec["loss"] = time.perf_counter() - t
        state["out"] = out0
        t = time.perf_counter(); mem_update(); rec["memory update"] = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        if rnd > 0:
            for k, v in rec.items():
                times[k].append(v)
    med = {k: median(v) for k, v in times.items()}
    parts = {"backbone": med["backbone"], "context head": max(med["head+loss"] - med["loss"], 0.0),
             "loss": med["loss"], "memory update": med["memory update"], "optimiser step": med["optimiser step"]}
    total = sum(parts.values())
    row = {"model": name, "input": f"1x3x{size}^2", "full_step_s": med["full"], "parts/full": total / med["full"]}
    for k, v in parts.items():
        row[f"{k} %"] = 100.0 * v / total
    row["memory update % of full step"] = 100.0 * med["memory update"] / med["full"]
    return row, {k: v for k, v in times.items()}


def run(opts) -> dict:
    import torch

    size = 128 if opts.quick else 512
    rounds = 1 if opts.quick else 2
    rows: List[dict] = []
    raw = {}
    for name, cfg, k in _models(opts.quick):
        row, times = _breakdown(name, cfg, k, size, rounds)
        rows.append(row)
        raw[name] = times
    targets = []
    for row in rows:
        if "mcibi" in row["model"] and "50" in row["model"]:
            share = row["memory update % of full step"]
            targets.append(target("memory update share of a training step (R50 DeepLabV3+MCIBI)", "<= 5%",
                                  f"{share:.2f}%", share <= 5.0))
    return {"rows": rows, "targets": targets, "raw_seconds": raw, "threads": torch.get_num_threads(),
            "timed_rounds": rounds}
