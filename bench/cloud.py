"""Group ``cloud`` (issue #25) - what the network-only cluster's services cost beside the local ones,
measured side by side in one run against servers on loopback (:mod:`pipeline.local_cloud`: moto's S3
server, PostgreSQL, ``mlflow server`` with artifacts proxied to the bucket):

* one checkpoint of the default study's model (weights, optimiser with momentum, RNG states: what a
  train stage writes each epoch) written and read back, in a local folder and in the bucket, through
  the filesystem layer the stages use (:mod:`pipeline.storage.filesystems`); median of ``n``;
* one logged training step (8 metrics, ``log_batch``) to the default SQLite store and to the tracking
  server, each directly from the head and through the head's store actor (the path of every rank);
  the logging job of ``bench.pipeline``.

Loopback has no network latency: these rows are the services' own cost, a floor for a real cloud.
Skipped (with the reason) where PostgreSQL is not installed.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import median, run_worker, worker_main
from pipeline.scratch import make_project

MODULE = "bench.cloud"


def _checkpoint_bytes() -> bytes:
    """A checkpoint of the default study's baseline after one SGD step (momentum buffers filled)."""
    import torch

    from ctxseg.config import load_params
    from ctxseg.engine import TrainState, build_optimizer, checkpoint_payload
    from ctxseg.models import build_segmentor

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    name = next(iter(params.models))
    model = build_segmentor(params.model_config_of(name), 7)
    optimizer = build_optimizer(model, params.train)
    model.train()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(0, 7, (2, 64, 64)))
    out["loss"].backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(model, optimizer, TrainState()), buffer)
    return buffer.getvalue()


def _checkpoint_io(spec: dict) -> dict:
    from pipeline.storage.filesystems import filesystem

    payload = _checkpoint_bytes()
    out = {"bytes": len(payload)}
    for name, location in spec["locations"].items():
        fs, base = filesystem(location)
        writes, reads = [], []
        for i in range(spec["n"]):
            folder = f"{base}/checkpoint_epoch_{i:04d}"
            fs.create_dir(folder, recursive=True)
            t0 = time.perf_counter()
            with fs.open_output_stream(f"{folder}/state.pt") as stream:
                stream.write(payload)
            t1 = time.perf_counter()
            with fs.open_input_file(f"{folder}/state.pt") as stream:
                assert len(stream.read()) == len(payload)
            reads.append(time.perf_counter() - t1)
            writes.append(t1 - t0)
        out[name] = {"write_s": median(writes[1:] or writes), "read_s": median(reads[1:] or reads)}
    return out


def _worker(spec: dict) -> dict:
    return {"checkpoint_io": _checkpoint_io}[spec["job"]](spec)


def run(opts) -> dict:
    from pipeline.local_cloud import LocalCloud, postgres_problem

    problem = postgres_problem()
    if problem:
        return {"skipped": problem, "rows": [], "targets": []}
    n_io, n_log = (5, 12) if opts.quick else (11, 40)
    base = Path(tempfile.mkdtemp(prefix="ctxseg-bench-cloud-"))
    saved = dict(os.environ)
    try:
        project = make_project(base / "project", {})
        with LocalCloud(base / "cloud") as cloud:
            os.environ.update({**cloud.env(), "AWS_ENDPOINT_URL": cloud.s3.direct_url})  # the server, no gateway
            ckpt = run_worker(MODULE, {"job": "checkpoint_io", "n": n_io, "locations": {
                "local": str(base / "checkpoints"), "bucket": f"s3://{cloud.s3.bucket}/bench/checkpoints"}})
            logging = {store: run_worker("bench.pipeline", {"job": "mlflow", "tracking_uri": uri, "n": n_log,
                                                            "root": str(project)})
                       for store, uri in (("sqlite", f"sqlite:///{base / 'mlflow.db'}"), ("server", cloud.mlflow.url))}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(base, ignore_errors=True)
    for result in (ckpt, *logging.values()):
        if "error" in result:
            raise RuntimeError(result["error"])
    local, bucket = ckpt["local"], ckpt["bucket"]
    local_s, bucket_s = local["write_s"] + local["read_s"], bucket["write_s"] + bucket["read_s"]
    sqlite = logging["sqlite"]["per_call_s"]
    rows = [
        {"measure": f"checkpoint write + read, local folder ({ckpt['bytes'] / 2**20:.1f} MiB)",
         "value": f"{1000 * local['write_s']:.1f} + {1000 * local['read_s']:.1f} ms"},
        {"measure": "checkpoint write + read, S3 bucket", "value": f"{1000 * bucket['write_s']:.1f} + "
                                                                   f"{1000 * bucket['read_s']:.1f} ms",
         "ratio": f"{bucket_s / local_s:.1f}x the local folder"},
    ]
    for store, label in (("sqlite", "SQLite file on the head"), ("server", "tracking server (PostgreSQL)")):
        for key, path in (("per_call_s", "from the head"), ("actor_per_call_s", "through the store actor")):
            value = logging[store][key]
            rows.append({"measure": f"logged step (8 metrics), {label}, {path}", "value": f"{1000 * value:.1f} ms",
                         "ratio": f"{value / sqlite:.2f}x SQLite from the head"})
    return {"rows": rows, "targets": [], "checkpoint_io": ckpt, "logging": logging}


if __name__ == "__main__":
    worker_main(_worker)
