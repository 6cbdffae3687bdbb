"""Group 4 - pipeline overheads, measured in a throw-away copy of the project (like the tests'
``make_project``): a fresh git + DVC repo holding ``ctxseg/``, ``pipeline/``, ``dvc.yaml`` and a
``params.yaml`` that trains only ``fcn`` on the default synthetic data and runs no sweep.

* full ``dvc repro`` once (1 epoch), then the no-op ``dvc repro`` wall time (median of 3);
* Ray Train vs plain process on identical work: ``python -m pipeline.train --model fcn`` (Ray Train,
  MLflow, checkpoints: the production stage) against ``python -m bench.pipeline --worker`` running
  the same ``ctxseg.engine`` loop (same params, loaders, seed, validation and per-epoch checkpoint
  files) without Ray or MLflow. The epoch count is calibrated to about ``--work-s`` seconds of
  plain work (120 by default). Reported: whole-process wall times and the in-loop epoch seconds;
* MLflow logging cost per logged step (the train stage's rank-0 tracker, SQLite store), against the
  training step time;
* data loading throughput (the train transform, ``num_loader_workers`` as in params) against the
  training throughput.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import yaml

from bench import median, run_worker, target, worker_main
from pipeline.scratch import make_project, pipeline_env

MODULE = "bench.pipeline"
def _env() -> dict:
    return pipeline_env()


def _sh(cmd: List[str], cwd: Path, timeout: float = 1800):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return dt, proc


# ----------------------------------------------------------------------------- workers
def _plain_train(spec: dict) -> dict:
    """The train stage's per-worker loop without Ray/MLflow (rank 0 of 1)."""
    t_start = time.perf_counter()
    import torch
    from torch.utils.data import DataLoader

    from ctxseg.config import load_params
    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform, build_train_transform
    from ctxseg.engine import (TrainState, build_optimizer, checkpoint_payload, seed_everything,
                               train_one_epoch, validate)
    from ctxseg.models import build_segmentor

    params = load_params(Path(spec["params"]))
    prepared = Path(spec["prepared"])
    cfg = params.model_config_of("fcn")
    torch.set_num_threads(max(1, int(params.scaling.cpus_per_worker)))
    seed_everything(params.seed * 1000)
    train_set = SegmentationDataset(prepared, "train", build_train_transform(params.data))
    val_set = SegmentationDataset(prepared, "val", build_eval_transform(params.data))
    num_classes = int(train_set.meta["num_classes"])
    bs = params.train.batch_size
    loader = DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=len(train_set) >= bs,
                        num_workers=params.data.num_loader_workers,
                        generator=torch.Generator().manual_seed(params.seed),
                        persistent_workers=params.data.num_loader_workers > 0)
    val_loader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=0)
    model = build_segmentor(cfg, num_classes)
    opt = build_optimizer(model, params.train)
    state = TrainState()
    epochs = int(spec.get("epochs") or params.train.epochs)
    total = epochs * len(loader)
    in_loop = 0.0
    ckpt_dir = Path(tempfile.mkdtemp(prefix="ctxseg-bench-plain-"))
    t_loop = time.perf_counter()
    epoch_loop, epoch_train = [], []
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        summary = train_one_epoch(model, loader, opt, state, params.train, total)
        in_loop += summary["epoch_seconds"]
        epoch_train.append(summary["epoch_seconds"])
        state.epoch = epoch + 1
        metrics = {"epoch": state.epoch}
        if state.epoch % params.train.val_every == 0 or state.epoch == epochs:
            metrics.update(validate(model, val_loader, num_classes))
        state.history.append({"epoch": state.epoch})
        torch.save(checkpoint_payload(model, opt, state), ckpt_dir / "state.pt")
        epoch_loop.append(time.perf_counter() - t_epoch)
    loop_s = time.perf_counter() - t_loop
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {"in_loop_s": in_loop, "loop_s": loop_s, "epoch_loop_s": epoch_loop, "epoch_train_s": epoch_train,
            "process_s": time.perf_counter() - t_start,
            "iterations": state.iteration, "epochs": epochs, "step_s": in_loop / max(state.iteration, 1),
            "train_images_per_s": state.iteration * bs / max(in_loop, 1e-9)}


def _loader(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from ctxseg.config import load_params
    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_train_transform

    params = load_params(Path(spec["params"]))
    torch.set_num_threads(max(1, int(params.scaling.cpus_per_worker)))
    ds = SegmentationDataset(Path(spec["prepared"]), "train", build_train_transform(params.data))
    loader = DataLoader(ds, batch_size=params.train.batch_size, shuffle=True,
                        num_workers=params.data.num_loader_workers)
    n = 0
    t0 = time.perf_counter()
    for _ in range(spec.get("epochs", 2)):
        for images, _labels in loader:
            n += images.shape[0]
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt}


def _mlflow(spec: dict) -> dict:
    """Per-step logging cost, side by side: the store's own client in the process (one machine), and
    the path every rank uses on a cluster (an actor call to the head's store actor, which logs)."""
    import mlflow
    import ray

    from ctxseg.config import parse_params
    from pipeline.ray_cluster import ray_env
    from pipeline.mlflow_tracking import tracking

    uri = spec["tracking_uri"]
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(f"bench-{os.getpid()}-{time.time_ns()}")
    record = {"loss": 1.0, "loss_o": 0.5, "loss_aux": 0.3, "lr": 0.01, "images_per_s": 20.0,
              "loss_w": 0.2, "loss_m": 0.1, "memory_momentum": 0.8}

    def timed(log_one) -> list:
        times = []
        for step in range(spec["n"]):
            t0 = time.perf_counter()
            log_one(step)
            times.append(time.perf_counter() - t0)
        return times

    direct_run, logged = client.create_run(exp).info.run_id, {}
    direct = timed(lambda step: tracking.log_metric_points(client, direct_run, record, step, logged))
    ray_env.init_ray(parse_params({}), Path(spec["root"]), num_cpus=1)
    try:
        store = tracking.start_store_actor(uri)
        actor_run = client.create_run(exp).info.run_id
        actor = timed(lambda step: ray.get(store.log_metric_points.remote(actor_run, record, step)))
    finally:
        ray.shutdown()
    return {"per_call_s": median(direct[2:] or direct), "actor_per_call_s": median(actor[2:] or actor),
            "calls": len(direct), "metrics_per_call": len(record)}


def _noop_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _ray_fixed(spec: dict) -> dict:
    """Where the Ray stage's fixed cost goes: imports, ``ray.init``, a TorchTrainer fit of a no-op loop."""
    t0 = time.perf_counter()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import mlflow  # noqa: F401  (the stage imports it too)
    from ctxseg.config import load_params
    from pipeline.ray_cluster import ray_env

    t_import = time.perf_counter() - t0
    params = load_params(Path(spec["params"]))
    t1 = time.perf_counter()
    ray_env.init_ray(params, Path(spec["root"]), params.ray.num_cpus)
    t_init = time.perf_counter() - t1
    from pipeline.ray_cluster.ray_train import without_placement_group_cleaner

    storage = tempfile.mkdtemp(prefix="ctxseg-bench-ray-")
    # Ray's stock trainer and the one a stage that owns its Ray fits (no placement-group cleaner actor),
    # interleaved after one uncounted warm-up fit (the first fit of an instance is slower): stock, stage's, ...
    fits: dict = {"stock": [], "stage": [], "warm-up": []}
    for i, kind in enumerate(["warm-up"] + ["stock", "stage"] * 2):
        trainer_class = without_placement_group_cleaner(TorchTrainer) if kind == "stage" else TorchTrainer
        t2 = time.perf_counter()
        trainer_class(_noop_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                      run_config=RunConfig(name=f"noop{i}", storage_path=storage)).fit()
        fits[kind].append(time.perf_counter() - t2)
    t3 = time.perf_counter()
    ray.shutdown()
    t_down = time.perf_counter() - t3
    shutil.rmtree(storage, ignore_errors=True)
    return {"import_s": t_import, "ray_init_s": t_init, "noop_fit_s": median(fits["stock"]),
            "stage_fit_s": median(fits["stage"]), "fits": fits, "shutdown_s": t_down}


def _worker(spec: dict) -> dict:
    return {"plain": _plain_train, "loader": _loader, "mlflow": _mlflow, "ray_fixed": _ray_fixed}[spec["job"]](spec)


# ----------------------------------------------------------------------------- driver
def tune_trial_rows(proj: Path, noop_fit_s) -> List[dict]:
    """A Tune trial's start + stop: two sweeps of the tune stage, 2 and 6 one-epoch trials run one at a time;
    (wall - the trials' step seconds) grows by the cost of 4 trials from one to the other, which cancels
    the stage's own fixed cost. Set beside a no-op TorchTrainer.fit (what every trial started and stopped
    before trials trained in their own, reused process)."""
    from bench.study import tune_step_seconds

    base = yaml.safe_load((proj / "params.yaml").read_text())
    outside = {}
    for name, space in (("two", {"acf.heads": {"grid": [1, 2]}}),
                        ("six", {"acf.heads": {"grid": [1, 2]}, "acf.mixtures": {"grid": [1, 2, 3]}})):
        params = dict(base, models={**base["models"], "fcn_acf": {"context": "acf"}})
        params["tune"] = {**base.get("tune", {}), "enabled": True, "epochs": 1, "scheduler": "fifo",
                          "seed_repeats": False, "max_concurrent_trials": 1, "cpus_per_worker": 2,
                          "sweeps": {name: {"model": "fcn_acf", "search": "grid", "space": space}}}
        path = proj / f"params_tune_{name}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        wall, _ = _sh([sys.executable, "-m", "pipeline.tune", "--params", str(path)], proj)
        steps, trials = tune_step_seconds(proj, name)
        outside[name] = (wall - steps, trials, wall)
    per_trial = (outside["six"][0] - outside["two"][0]) / (outside["six"][1] - outside["two"][1])
    rows = [{"measure": "Tune trial start + stop (1-epoch trials, one at a time; slope from 2 to 6 trials)",
             "value": f"{per_trial:.1f} s",
             "ratio": (f"{per_trial / noop_fit_s:.2f}x a no-op TorchTrainer.fit ({noop_fit_s:.1f} s, each trial's "
                       "floor before)" if noop_fit_s else "")},
            {"measure": "tune stage, 2 / 6 trials (whole process; outside steps)",
             "value": f"{outside['two'][2]:.1f} / {outside['six'][2]:.1f} s",
             "ratio": f"{outside['two'][0]:.1f} / {outside['six'][0]:.1f} s outside the trials' steps"}]
    return rows


def run(opts) -> dict:
    quick = opts.quick
    work_s = opts.work_s if not quick else 10.0
    base = Path(tempfile.mkdtemp(prefix="ctxseg-bench-pipeline-"))
    rows: List[dict] = []
    targets: List[dict] = []
    data = ({"synthetic": {"num_train": 16, "num_val": 4, "image_size": 96, "min_cue_distance": 32},
             "augment": {"crop_size": [96, 96]}} if quick else {})
    overrides = {"seeds": [0],  # one training per stage: the Ray stage and the plain process do the same work
                 "data": data,
                 "train": {"epochs": 1, "batch_size": 4 if quick else 8},
                 "scaling": {"num_workers": 1},
                 "evaluate": {"scales": [0.75, 1.0], "num_visualisations": 1}}
    proj = make_project(base / "project", overrides)
    # With no sweep the tune stage does not create its persisted output tune/ray, and the next
    # `dvc repro` then fails ("output 'tune/ray' does not exist"); pre-create it (persisted outputs
    # are not removed before the stage runs).
    (proj / "tune" / "ray").mkdir(parents=True, exist_ok=True)
    try:
        full_s, _ = _sh([sys.executable, "-m", "dvc", "repro"], proj)
        noop = []
        for _ in range(3):
            dt, proc = _sh([sys.executable, "-m", "dvc", "repro"], proj)
            noop.append(dt)
        noop_s = median(noop)
        rows.append({"measure": "dvc repro, full (tiny study, 1 epoch)", "value": f"{full_s:.1f} s"})
        rows.append({"measure": "dvc repro, no-op (median of 3)", "value": f"{noop_s:.2f} s",
                     "ratio": f"{noop_s / full_s:.3f} of the full repro"})
        targets.append(target("no-op dvc repro", "<= 5 s", f"{noop_s:.2f} s", noop_s <= 5.0))

        params_path = proj / "params.yaml"
        prepared = proj / "data" / "prepared" / "synthetic"
        # calibrate: three plain epochs (median of the 2nd and 3rd: the first warms up)
        cal = run_worker(MODULE, {"job": "plain", "params": str(params_path), "prepared": str(prepared),
                                  "epochs": 3})
        if "error" in cal:
            raise RuntimeError(cal["error"])
        epoch_s = median(cal["epoch_loop_s"][1:] or cal["epoch_loop_s"])
        epochs = int(max(2, min(100, round(work_s / max(epoch_s, 1e-3)))))
        bench_params = yaml.safe_load(params_path.read_text())
        bench_params["train"]["epochs"] = epochs
        bp = proj / "params_bench.yaml"
        bp.write_text(yaml.safe_dump(bench_params, sort_keys=False))
        # plain, Ray, plain: the Ray run is compared with the mean of the two plain runs around it, which
        # cancels a drift in the machine's speed; their spread is the noise level of this comparison.
        t_plain = time.perf_counter()
        plain = run_worker(MODULE, {"job": "plain", "params": str(bp), "prepared": str(prepared)})
        plain_wall1 = time.perf_counter() - t_plain
        t0 = time.perf_counter()
        _sh([sys.executable, "-m", "pipeline.train", "--model", "fcn", "--params", str(bp)], proj)
        ray_wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        plain2 = run_worker(MODULE, {"job": "plain", "params": str(bp), "prepared": str(prepared)})
        plain_wall2 = time.perf_counter() - t1
        run_json = json.loads((proj / "models" / "fcn" / "seeds" / "0" / "run.json").read_text())
        ray_in_loop = sum(h.get("train_epoch_seconds", 0.0) for h in run_json.get("history", []))
        plain_loop = median([plain["in_loop_s"], plain2["in_loop_s"]])
        plain_wall = median([plain_wall1, plain_wall2])
        noise = abs(plain_wall1 - plain_wall2) / plain_wall
        overhead = ray_wall / plain_wall - 1.0
        rows.append({"measure": f"plain process, {epochs} epochs x {plain['iterations'] // epochs} it (whole process)",
                     "value": f"{plain_wall:.1f} s",
                     "ratio": f"runs before/after Ray {plain_wall1:.1f} / {plain_wall2:.1f} s "
                              f"(noise {100 * noise:.1f}%); in-loop {plain_loop:.1f} s"})
        rows.append({"measure": "Ray Train stage (python -m pipeline.train, whole process)", "value": f"{ray_wall:.1f} s",
                     "ratio": f"in-loop {ray_in_loop:.1f} s"})
        rows.append({"measure": "Ray Train overhead, whole process", "value": f"{100 * overhead:.1f} %",
                     "ratio": f"{ray_wall:.1f} / {plain_wall:.1f} s, +-{100 * noise:.1f}% machine noise"})
        in_loop_frac = ray_in_loop / plain_loop - 1.0
        fixed_s = ray_wall - plain_wall - (ray_in_loop - plain_loop)
        rows.append({"measure": "Ray Train overhead, in-loop (per-step)", "value": f"{100 * in_loop_frac:.1f} %",
                     "ratio": f"fixed cost {fixed_s:.1f} s"})
        # The same per step, from the median epoch: a burst of load on the machine moves a few epochs
        # and the total, not the median; the two plain runs' medians give this figure's own noise.
        ray_epochs = [h["train_epoch_seconds"] for h in run_json.get("history", []) if "train_epoch_seconds" in h]
        plain_meds = [median(plain["epoch_train_s"]), median(plain2["epoch_train_s"])]
        if ray_epochs:
            step_frac = median(ray_epochs) / median(plain_meds) - 1.0
            step_noise = abs(plain_meds[0] - plain_meds[1]) / median(plain_meds)
            rows.append({"measure": "Ray Train overhead per step (median epoch)", "value": f"{100 * step_frac:.1f} %",
                         "ratio": f"median epoch {median(ray_epochs):.3f} s vs plain {plain_meds[0]:.3f} / "
                                  f"{plain_meds[1]:.3f} s (noise {100 * step_noise:.1f}%)"})
            targets.append(target("Ray Train per-step overhead (median epoch)", "<= 5%", f"{100 * step_frac:.1f}%",
                                  step_frac <= 0.05, f"noise between the plain runs {100 * step_noise:.1f}%"))
        # overhead(W) = fixed / W + in-loop fraction: the plain work W at which it falls to 15%
        break_even = fixed_s / (0.15 - in_loop_frac) if in_loop_frac < 0.15 else float("inf")
        rows.append({"measure": "plain work at which the Ray overhead falls to 15%",
                     "value": f"{break_even:.0f} s" if break_even != float("inf") else "never (in-loop >= 15%)",
                     "ratio": f"fixed {fixed_s:.1f} s / (15% - {100 * in_loop_frac:.1f}% in-loop)"})
        targets.append(target("Ray Train vs plain process (~2 min of work)", "<= 15% overhead",
                              f"{100 * overhead:.1f}%", overhead <= 0.15,
                              f"work {plain_wall:.0f} s plain; fixed {fixed_s:.0f} s + in-loop {100 * in_loop_frac:.1f}%;"
                              f" 15% from {break_even:.0f} s of work"))

        rf = run_worker(MODULE, {"job": "ray_fixed", "params": str(bp), "root": str(proj)})
        if "error" not in rf:
            rows.append({"measure": "Ray fixed cost: imports / ray.init / no-op fit (the stage's trainer) / shutdown",
                         "value": f"{rf['import_s']:.1f} / {rf['ray_init_s']:.1f} / {rf['stage_fit_s']:.1f} / "
                                  f"{rf['shutdown_s']:.1f} s",
                         "ratio": f"{100 * (rf['ray_init_s'] + rf['stage_fit_s']) / plain_wall:.0f}% of the plain run"})
            rows.append({"measure": "no-op fit: the stage's trainer (no placement-group cleaner) vs Ray's stock TorchTrainer",
                         "value": f"{rf['stage_fit_s']:.1f} / {rf['noop_fit_s']:.1f} s",
                         "ratio": f"{rf['noop_fit_s'] / rf['stage_fit_s']:.2f}x faster (medians of 2, interleaved: "
                                  f"{', '.join(f'{v:.1f}' for v in rf['fits']['stock'])} / "
                                  f"{', '.join(f'{v:.1f}' for v in rf['fits']['stage'])} s)"})
        rows += tune_trial_rows(proj, rf.get("noop_fit_s"))
        ml = run_worker(MODULE, {"job": "mlflow", "tracking_uri": f"sqlite:///{base / 'mlflow_bench.db'}",
                                 "n": 12 if quick else 40, "root": str(proj)})
        step_s = plain2["step_s"]
        log_every = bench_params["train"].get("log_every", 5)
        rows.append({"measure": "MLflow log_batch per logged step (8 metrics, SQLite)",
                     "value": f"{1000 * ml['per_call_s']:.1f} ms",
                     "ratio": f"{100 * ml['per_call_s'] / step_s:.1f}% of one step; "
                              f"{100 * ml['per_call_s'] / (step_s * log_every):.2f}% amortised (log_every={log_every})"})
        rows.append({"measure": "... the same through the head's store actor (the path of every rank, any node)",
                     "value": f"{1000 * ml['actor_per_call_s']:.1f} ms",
                     "ratio": f"{ml['actor_per_call_s'] / ml['per_call_s']:.2f}x the direct call; "
                              f"{100 * ml['actor_per_call_s'] / (step_s * log_every):.2f}% of the steps it covers"})
        ld = run_worker(MODULE, {"job": "loader", "params": str(bp), "prepared": str(prepared),
                                 "epochs": 1 if quick else 3})
        tr_ips = plain2["train_images_per_s"]
        load_ratio = ld["images_per_s"] / tr_ips
        rows.append({"measure": "data loading (train transform, num_loader_workers from params)",
                     "value": f"{ld['images_per_s']:.0f} img/s",
                     "ratio": f"{load_ratio:.1f}x the training throughput ({tr_ips:.1f} img/s incl. loading)"})
        targets.append(target("data loader never the bottleneck", "loader img/s > training img/s",
                              f"{load_ratio:.1f}x", load_ratio > 1.0,
                              f"loading is {100 * tr_ips / ld['images_per_s']:.0f}% of a step with 0 loader workers"))
        return {"rows": rows, "targets": targets, "epochs": epochs, "work_s_target": work_s,
                "noop_runs_s": noop, "plain": [plain, plain2], "plain_wall_s": [plain_wall1, plain_wall2],
                "ray_wall_s": ray_wall, "ray_in_loop_s": ray_in_loop,
                "ray_fixed": rf, "mlflow": ml, "loader": ld}
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    worker_main(_worker)
