"""Group 5 - evaluation throughput.

* ``ConfusionMatrix.update`` in pixels/s (K = 19 and 150, 4 maps of 512 x 512 with 5% ignore), beside
  the cost of the argmax that produces the prediction (same run) as a ratio;
* multi-scale + flip (``evaluate.scales`` of params.yaml, flip) against single-scale whole-image
  inference (``ctxseg.inference.predict_probs``) for the default model on the synthetic image size
  (128^2, batch 8) and at 512^2 (batch 1); the theoretical ratio is 2 x sum(scale^2).
"""
from __future__ import annotations

from typing import List

from bench import interleaved, median

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def run(opts) -> dict:
    import torch

    from ctxseg.inference import predict_probs
    from ctxseg.metrics import ConfusionMatrix
    from ctxseg.models import ModelConfig, build_segmentor

    quick = opts.quick
    rows: List[dict] = []
    side, n = (128, 2) if quick else (512, 4)
    reps = 3 if quick else 7
    g = torch.Generator().manual_seed(0)
    for k in (19, 150):
        target_map = torch.randint(0, k, (n, side, side), generator=g)
        target_map[:, : side // 20] = 255
        logits = torch.randn(n, k, side, side, generator=g)
        pred = logits.argmax(1)
        cm = ConfusionMatrix(k)
        t = interleaved({"update": lambda: cm.update(pred, target_map), "argmax": lambda: logits.argmax(1)},
                        repeats=reps)
        px = n * side * side
        rows.append({"what": f"confusion-matrix update, K={k}", "pixels": px,
                     "Mpixels_per_s": px / median(t["update"]) / 1e6,
                     "ratio": f"{median(t['update']) / median(t['argmax']):.2f}x the argmax over K"})
    torch.manual_seed(0)
    model = build_segmentor(ModelConfig(), 19).eval()
    theo = 2 * sum(s * s for s in SCALES)
    cases = [(128, 8), (512, 1)] if not quick else [(64, 2)]
    for size, batch in cases:
        images = torch.randn(batch, 3, size, size, generator=g)
        t = interleaved({"single": lambda: predict_probs(model, images),
                         "ms_flip": lambda: predict_probs(model, images, scales=SCALES, flip=True)},
                        repeats=2 if quick else 3)
        ratio = median(t["ms_flip"]) / median(t["single"])
        rows.append({"what": f"multi-scale+flip vs single-scale, default model, {batch}x3x{size}^2",
                     "pixels": batch * size * size,
                     "ratio": f"{ratio:.1f}x (theory {theo:.2f}x = 2 x sum scale^2)",
                     "single_s": median(t["single"]), "ms_flip_s": median(t["ms_flip"])})
    return {"rows": rows, "targets": [], "scales": list(SCALES)}
