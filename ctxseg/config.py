"""The one typed, validated configuration of a study (``params.yaml``).

Every pipeline stage calls :func:`load_params` before it does any work. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError`, whose message names the key, the bad value and what is
allowed. Nothing is silently defaulted for a typo.

Sections and where their schema lives (one concept, one place):

=============  ==================================  =====================================
section        schema                              used by
=============  ==================================  =====================================
``data``       :class:`ctxseg.data.DataConfig`     download, preprocess, train, evaluate
``model``      :class:`ctxseg.models.ModelConfig`  defaults shared by every model
``models``     name -> overrides of ``model``      train / evaluate (one DVC stage each)
``train``      :class:`TrainConfig`                train, tune
``scaling``    :class:`ScalingConfig`              train, tune (Ray Train workers)
``ray``        :class:`RayConfig`                  train, tune
``mlflow``     :class:`MLflowConfig`               train, tune, evaluate, report
``evaluate``   :class:`EvaluateConfig`             evaluate
``report``     :class:`ReportConfig`               report
=============  ==================================  =====================================
"""
from __future__ import annotations

import copy
import difflib
import itertools
import os
import re
import sys
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ctxseg.data.config import DataConfig
from ctxseg import param_reads
from ctxseg.errors import UserError
from ctxseg.models.config import ModelConfig

# \Z, not $: "$" also matches before a trailing newline, so "name\n" would pass. Used with re.fullmatch.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z"
MODEL_NAME_RULE = "start with a letter or digit and hold only letters, digits, '_', '.' and '-'"


class ConfigError(UserError, ValueError):
    """params.yaml is invalid. The message lists every problem with its key, value and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TrainConfig(StrictModel):
    """Optimisation, as in both papers: SGD, momentum 0.9, weight decay 5e-4, poly decay (power 0.9)."""

    epochs: int = Field(4, ge=1, description="passes over the training split")
    batch_size: int = Field(8, ge=1, description="global batch size (split over Ray workers)")
    lr: float = Field(0.01, gt=0, description="base learning rate")
    min_lr: float = Field(1e-4, ge=0, description="floor of the poly schedule")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    poly_power: float = Field(0.9, gt=0, description="lr = (lr0 - min_lr)(1 - t/T)^power + min_lr, per iteration")
    log_every: int = Field(10, ge=1, description="iterations between logged loss lines / MLflow points")
    val_every: int = Field(1, ge=1, description="epochs between validation passes (the last epoch always validates)")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="autocast dtype on GPU; ignored on CPU")
    max_failures: int = Field(2, ge=0, description="worker crashes Ray Train recovers from (restart from checkpoint)")
    checkpoints_to_keep: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _lr_floor(self) -> "TrainConfig":
        if self.min_lr >= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be below lr ({self.lr})")
        return self


class ScalingConfig(StrictModel):
    """Ray Train workers (DDP ranks). ``use_gpu: auto`` uses GPUs when the Ray cluster has any."""

    num_workers: int = Field(1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: float = Field(2, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    sync_batchnorm: bool = Field(True, description="convert BatchNorm to SyncBatchNorm when world size > 1")


class RayConfig(StrictModel):
    """Where Ray runs. ``address: null`` starts a local instance unless RAY_ADDRESS is set."""

    address: Optional[str] = Field(None, description='"auto", "ray://host:10001" or "host:6379"; null = local')
    storage_path: Optional[str] = Field(
        None, description="where Ray Train keeps checkpoints and Tune its trials: an s3:// (any pyarrow.fs) URI "
        "or a path on a mount every node shares; null = models/<model>/ray and tune/ray in the repo (single node only). "
        "S3 credentials and endpoint come from each node's environment (AWS_* variables, profile or role; "
        "AWS_ENDPOINT_URL for MinIO and the like), never from params"
    )
    data_path: Optional[str] = Field(
        None, description="where workers on other nodes read the prepared dataset: a path on a mount every node "
        "shares (read in place) or a pyarrow.fs URI such as s3://bucket/prefix (copied once into a node-local cache); "
        "the driver publishes data/prepared/<dataset> there. null = workers read the repo's copy (driver's node only)"
    )
    num_cpus: Optional[int] = Field(
        None, ge=1, description="CPUs of the stage's local Ray instance; null = all of this machine's (size it down "
        "to run two studies side by side, e.g. 1 each for `dvc queue start -j 2` on 2 cores)"
    )
    worker_start_timeout_s: float = Field(
        120, gt=0, description="how long a training run (or sweep trial) waits for its Ray Train workers to start "
        "before the attempt fails"
    )
    worker_start_attempts: int = Field(
        3, ge=1, description="attempts to start the workers before the run fails with a message saying what was "
        "short (CPUs, GPUs, a leaked placement group); a stage never waits forever"
    )


#: Params that say where and how a stage runs, not what it computes: no stage needs to declare them in
#: dvc.yaml (moving a study onto a cluster, resizing its Ray or data loaders, or renaming its MLflow store
#: must not re-train it). The params-declaration test checks every other key a stage reads.
RUN_SETTINGS = ("ray", "mlflow", "data.num_loader_workers", "data.preprocess_workers")


class MLflowConfig(StrictModel):
    tracking_uri: Optional[str] = Field(None, description="null = sqlite:///<repo>/mlflow.db (or $MLFLOW_TRACKING_URI); "
                                        "a tracking server: http(s)://host:port (token: $MLFLOW_TRACKING_TOKEN)")
    artifact_root: Optional[str] = Field(None, description="null = <repo>/mlartifacts for the default store; the "
                                         "server's own (e.g. proxied to a bucket) for a tracking server")
    experiment: str = Field("ctxseg", min_length=1)
    system_metrics: bool = True
    log_model: bool = True

    @field_validator("experiment")
    @classmethod
    def _experiment_inside_artifact_root(cls, name: str) -> str:
        """The name becomes ``<artifact_root>/<name>``: it must stay one folder below the root."""
        bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
        if bad:
            raise ValueError(f"experiment name {name!r} contains control characters "
                             f"({', '.join(repr(c) for c in sorted(set(bad)))}); use a plain name such as 'ctxseg'")
        if "/" in name or "\\" in name or name in (".", "..") or name != name.strip() or name.startswith("."):
            raise ValueError(f"experiment name {name!r} must be a single folder name (no '/', '\\', leading '.' or "
                             f"surrounding spaces): its artifacts go to <mlflow.artifact_root>/<experiment> and must "
                             f"not leave the artifact root")
        return name


class EvaluateConfig(StrictModel):
    """Single-scale and multi-scale + flip evaluation, as both papers report."""

    split: str = Field("val", min_length=1, description="split of the prepared dataset to score")
    mode: Literal["whole", "slide"] = "whole"
    crop_size: int = Field(512, ge=8, description="sliding-window crop (mode: slide)")
    stride: int = Field(341, ge=1, description="sliding-window stride (mode: slide)")
    multi_scale: bool = Field(True, description="also report multi-scale + flip")
    scales: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True
    batch_size: int = Field(8, ge=1, description="images per forward pass (same-size images are batched)")
    num_visualisations: int = Field(4, ge=0, description="fixed sample of val images rendered with the palette")
    feature_images: int = Field(
        64, ge=0, description="images whose per-class mean features (classifier input) are kept for the "
        "report's feature-space figure; 0 = off")
    log_mlflow: bool = Field(True, description="log metrics, plots and predictions to the model's MLflow run")

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, scales: list[float]) -> list[float]:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
        return scales

    @model_validator(mode="after")
    def _stride_fits(self) -> "EvaluateConfig":
        if self.stride > self.crop_size:
            raise ValueError(f"stride ({self.stride}) must not exceed crop_size ({self.crop_size})")
        return self


class ReportConfig(StrictModel):
    """What ``reports/report.md`` / ``report.html`` show (sections: see ``pipeline/report.py``)."""

    title: str = Field("ctxseg study", description="heading of reports/report.md")
    baseline_context: Literal["none"] = Field("none", description="context of the baseline every delta is taken against")
    ablations: list[Literal["fusion", "memory"]] = Field(
        default_factory=lambda: ["fusion", "memory"],
        description="ablation tables shown when their runs exist: fusion = MCIBI Table 1 (mcibi.fusion); "
        "memory = MCIBI Table 2 (mcibi.init / update / momentum_power / rcl)")
    sweeps: bool = Field(True, description="show tune/results.csv (K x H grid, m0 / alpha / beta) when present")
    complexity: bool = Field(True, description="params / FLOPs / CPU latency per context module (MCIBI Table 3)")
    latency_in_channels: int = Field(256, ge=8, description="channels of the latency-measurement input")
    latency_size: int = Field(32, ge=8, description="side of the latency-measurement input (small: CPU budget)")
    latency_channels: int = Field(64, ge=8, description="decode-head width of the latency measurement")
    latency_repeats: int = Field(3, ge=1, le=100, description="timed round-robin runs per module; the best is shown")
    qualitative_images: int = Field(4, ge=0, description="rows of the image / GT / models grid (MCIBI Fig 4)")
    feature_space: bool = Field(True, description="PCA of per-image class features, baseline vs MCIBI (MCIBI Fig 3)")
    training_curves_from_mlflow: bool = Field(
        True, description="per-iteration loss from MLflow (falls back to run.json's per-epoch history)")
    register_model: bool = Field(True, description="register the best model (by mIoU) in the MLflow Model Registry")
    registered_model_name: Optional[str] = Field(None, description="null = ctxseg-<data.name>")

    @field_validator("ablations")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"ablations lists a table twice: {v}")
        return v


class SearchDimension(StrictModel):
    """One swept key. Exactly one of: ``grid`` (every value), ``choice`` (sampled), ``uniform`` /
    ``loguniform`` ([low, high] floats) or ``randint`` ([low, high) integers)."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice") and not values:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(values)}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs positive bounds, got {list(values)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the model config (every listed value, or both bounds)."""
        values = getattr(self, self.kind)
        return list(values) if self.kind in ("grid", "choice") else [values[0], values[1] - (self.kind == "randint")]


class SweepConfig(StrictModel):
    """One Ray Tune sweep over the architecture/loss keys of one model of ``models``."""

    model: str = Field(..., description="a key of `models`: the base config of every trial")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the full grid; random/optuna: trials")
    space: dict[str, SearchDimension] = Field(
        ..., description="model-config key (e.g. acf.mixtures, mcibi.alpha) -> search dimension"
    )

    @model_validator(mode="after")
    def _grid_only_with_grid(self) -> "SweepConfig":
        if not self.space:
            raise ValueError("space must name at least one key")
        if self.search == "grid":
            bad = [k for k, d in self.space.items() if d.kind not in ("grid", "choice")]
            if bad:
                raise ValueError(f"search: grid can only enumerate grid/choice dimensions; {bad} are continuous "
                                 f"(use search: random or optuna)")
        return self


class TuneConfig(StrictModel):
    """Ray Tune sweeps (the ``tune`` stage). Each trial is a full Ray Train run of the train stage's code."""

    enabled: bool = Field(
        False, description="run the sweeps; off, the tune stage writes empty results at once (the default study "
        "spends its time on seeds: short trials rank nothing, docs/sweeps.md)")
    epochs: int = Field(2, ge=1, description="epochs per trial (ASHA's max_t)")
    metric: Literal["val_mIoU", "val_pixAcc", "val_mAcc"] = "val_mIoU"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor of trials per rung")
    max_concurrent_trials: int = Field(2, ge=1)
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) of each trial")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker of a trial (0 = CPU)")
    seed: int = Field(0, ge=0, description="seed of the random / Optuna searcher")
    seed_repeats: bool = Field(
        True, description="after each sweep, train its best and worst configuration again with seed + 1 (same "
        "epochs) so the report can weigh the grid's spread against seed noise")
    sweeps: dict[str, SweepConfig] = Field(default_factory=dict)

    @field_validator("sweeps")
    @classmethod
    def _sweep_names(cls, sweeps: dict[str, SweepConfig]) -> dict[str, SweepConfig]:
        for name in sweeps:
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"sweep name {name!r} must {MODEL_NAME_RULE} (it names folders and runs)")
        return sweeps


class Params(StrictModel):
    """The whole of params.yaml."""

    seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="the study's seeds: every model trains and is evaluated once per seed "
        "(weight init, sampling, augmentation; rank r of seed s uses s*1000+r); verdicts need at least 2")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {"fcn": ModelConfig(framework="fcn", context="none")}
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_model_defaults(cls, raw: Any) -> Any:
        """Each entry of ``models`` is ``model`` deep-merged with the entry's own overrides."""
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            return raw
        defaults = raw.get("model") or {}
        if isinstance(defaults, BaseModel):
            defaults = defaults.model_dump()
        if not isinstance(defaults, dict):
            return raw
        merged = {}
        for name, overrides in raw["models"].items():
            if isinstance(overrides, BaseModel):
                overrides = overrides.model_dump()
            merged[name] = deep_merge(defaults, overrides or {}) if isinstance(overrides, (dict, type(None))) else overrides
        return {**raw, "models": merged}

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not models:
            raise ValueError("at least one model must be listed")
        for name in models:
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must {MODEL_NAME_RULE} (it names folders and runs)")
        return models

    @model_validator(mode="after")
    def _sweeps_fit_models(self) -> "Params":
        """Every sweep names a listed model, and every value it can try is a valid config of that model."""
        for sweep_name, sweep in self.tune.sweeps.items():
            where = f"tune.sweeps.{sweep_name}"
            if sweep.model not in self.models:
                raise ValueError(f"{where}.model = {sweep.model!r} is not a key of `models` ({sorted(self.models)})")
            base = self.models[sweep.model].model_dump()
            keys = list(sweep.space)
            combos = itertools.islice(itertools.product(*(sweep.space[k].probe_values() for k in keys)), 4096)
            for combo in combos:
                overrides = dict(zip(keys, combo))
                try:
                    ModelConfig.model_validate(deep_merge(base, unflatten(overrides)))
                except ValidationError as err:
                    first = err.errors()[0]
                    loc = ".".join(str(p) for p in first["loc"])
                    msg = first["msg"].removeprefix("Value error, ")
                    shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
                    raise ValueError(
                        f"{where}.space: {shown} makes model {sweep.model!r} invalid ({loc or 'model'}: {msg})"
                    ) from None
        return self

    @model_validator(mode="after")
    def _name_backbone_blocks(self) -> "Params":
        """Tell each backbone block its key, so a missing pretrained file is reported as
        ``models.<name>.backbone.pretrained``."""
        self.model.backbone._origin = "model.backbone"
        for name, cfg in self.models.items():
            cfg.backbone._origin = f"models.{name}.backbone"
        return self

    _run_seed: Optional[int] = PrivateAttr(None)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {seeds}")
        return seeds

    @property
    def seed(self) -> int:
        """The seed of one training run: the one :meth:`for_seed` chose, else the study's first seed."""
        return self.seeds[0] if self._run_seed is None else self._run_seed

    def for_seed(self, seed: int) -> "Params":
        """These params for the training run of one seed (``params.seed``); nothing else changes."""
        run = self.model_copy()
        run._run_seed = int(seed)
        return run

    def model_config_of(self, name: str) -> ModelConfig:
        """The resolved config of model ``name`` (a key of ``models``)."""
        if name not in self.models:
            raise ConfigError(f"model {name!r} is not listed under `models` in params.yaml; listed: {sorted(self.models)}")
        return self.models[name]


def deep_merge(base: dict, overrides: dict) -> dict:
    """Return ``base`` updated recursively with ``overrides`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_params(raw: Any, source: str = "params.yaml", watch_reads: bool = True) -> Params:
    """Validate a params mapping; raise :class:`ConfigError` naming every bad key.

    ``watch_reads``: hand the result to :func:`ctxseg.param_reads.watch` (a no-op outside the test that
    checks every stage declares the params it reads)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    if watch_reads:
        param_reads.watch(params)
    return params


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans that refuses a key given twice in one mapping.

    YAML 1.2 booleans: only ``true`` / ``false`` are booleans, as for DVC (ruamel, YAML 1.2). PyYAML
    follows YAML 1.1, where ``off``, ``on``, ``yes``, ``no``, ``y`` and ``n`` are booleans too: DVC's
    ``dvc exp run -S`` rewrites params.yaml and writes ``amp: off`` without quotes, which PyYAML would
    read back as ``False``. With 1.2 booleans both tools read the same values. PyYAML otherwise keeps
    the last of two equal keys silently; here it is an error naming both lines.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base constructor reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same "
                                    f"section (first on line {first.line + 1}); YAML would silently keep only the last. "
                                    f"Keep one of them.")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: Path) -> Any:
    """Parse a params / preset file; invalid YAML or a duplicate key is a :class:`ConfigError` naming the line."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None


def load_params(path: str | Path = "params.yaml", overrides: Optional[dict] = None) -> Params:
    """Read, merge ``overrides`` (a nested dict) into, and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Run from the project root, or pass the path of params.yaml.")
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty. Restore it (e.g. `git checkout -- {path.name}`) or write at "
                          f"least the sections you change; every key is listed in docs/params.md.")
    if overrides:
        raw = deep_merge(raw or {}, overrides)
    params = parse_params(raw, source=str(path), watch_reads=False)
    resolve_paths(params, path.resolve().parent)  # the stage's own reads start after this bookkeeping
    param_reads.watch(params)
    return params


def resolve_paths(params: Params, base: Path) -> Params:
    """Make every ``backbone.pretrained`` absolute, relative paths taken from ``base`` (the folder of
    params.yaml), in place: Ray workers change directory before they build the model. The file is not
    opened here (evaluate, predict and register never need it); a missing one is refused when a model is
    built from it, naming the key ``models.<name>.backbone.pretrained``."""
    for cfg in (params.model, *params.models.values()):
        if cfg.backbone.pretrained:
            full = Path(cfg.backbone.pretrained).expanduser()
            if not full.is_absolute():
                cfg.backbone.pretrained = os.path.normpath(base / full)
    return params


def params_to_dict(params: Params) -> dict:
    """Plain-data form of the params (what gets logged and hashed)."""
    return params.model_dump(mode="json")


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ----------------------------------------------------------------------------------------------
# error messages


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after"))]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc[:-1])
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                hint = f" Did you mean `{'.'.join(str(p) for p in loc[:-1] + [close[0]])}`?"
            lines.append(
                f"  - `{key}`: unknown key.{hint} Allowed keys here: {', '.join(allowed) or '(none)'}."
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if not loc:
                lines.append(f"  - {msg}.")
            else:
                lines.append(f"  - `{key}` = {_short(e.get('input'))}: {msg}.")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict) else "{" + ", ".join(map(str, value)) + "}"
    return text if len(text) <= 80 else text[:77] + "..."


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Union-with-None and return the inner model class or container annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
            if typing.get_origin(inner) is dict:
                return inner
        return annotation
    return annotation


def _allowed_keys(model: Any, loc: list) -> list[str]:
    """Field names of the (nested) model found at ``loc``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if typing.get_origin(current) is dict:
        return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


# ----------------------------------------------------------------------------------------------
# params reference (docs/params.md is generated from the schema, so it cannot drift)

REFERENCE_DOC = "docs/params.md"
REFERENCE_START = f"<!-- params-reference:start (generated by `python -m ctxseg.config --docs {REFERENCE_DOC}`) -->"
REFERENCE_END = "<!-- params-reference:end -->"


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or `null`" if type(None) in args else text
    if origin in (list, tuple):
        inner = ", ".join(_type_text(a) for a in args if a is not Ellipsis)
        return f"list[{inner}]" if origin is list else f"[{inner}]"
    if origin is dict:
        return f"map of {_type_text(args[1])}"
    if isinstance(annotation, type):
        return {"int": "int", "float": "float", "bool": "bool", "str": "str"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _reference_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = _unwrap(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if field.description:
                rows.append((key, "section", "", field.description))
            rows += _reference_rows(annotation, key + ".")
            continue
        if typing.get_origin(annotation) is dict:
            value_type = _unwrap(typing.get_args(annotation)[1])
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                rows.append((key, f"map: name → {value_type.__name__}", "", field.description or ""))
                if value_type is not ModelConfig:
                    rows += _reference_rows(value_type, f"{key}.<name>.")
                continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = "…"
        shown = "required" if field.is_required() else "`null`" if default is None else f"`{default}`"
        kind = _type_text(field.annotation)
        bounds = _bounds(field)
        rows.append((key, f"{kind}{' (' + bounds + ')' if bounds else ''}", shown, field.description or ""))
    return rows


def _markdown_text(text: str) -> str:
    """``text`` for a Markdown table cell: pipes escaped, and ``<`` outside code spans written ``&lt;`` so
    that a placeholder such as <repo> is shown, not taken for an HTML tag."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def params_reference_markdown() -> str:
    """Every key of params.yaml with its type, bounds, default and meaning, as a Markdown table."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, desc in _reference_rows(Params, ""):
        desc = _markdown_text(desc)
        lines.append(f"| `{key}` | {kind} | {default} | {desc} |")
    lines.append("")
    lines.append("Each entry of `models` takes every key of `model` (above), deep-merged over `model`.")
    return "\n".join(lines)


def update_reference(path: Path) -> bool:
    """Rewrite the generated params reference between the markers inside ``path`` (docs/params.md);
    return True if it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(REFERENCE_START), text.index(REFERENCE_END)
    new = text[: start + len(REFERENCE_START)] + "\n" + params_reference_markdown() + "\n" + text[end:]
    if new != text:
        from ctxseg.io import write_text

        write_text(path, new)
    return new != text


def apply_preset(params_path: Path, preset_path: Path) -> dict:
    """``params_path`` deep-merged with a preset's overrides (``presets/<dataset>.yaml``), validated."""
    base = read_yaml(Path(params_path)) or {}
    try:
        preset = read_yaml(Path(preset_path)) or {}
    except OSError as err:
        raise ConfigError(f"{preset_path}: cannot read the preset ({err.strerror}); presets live in presets/") from None
    merged = deep_merge(base, preset)
    parse_params(merged, source=f"{params_path} + {preset_path}")
    return merged


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="params.yaml schema tools")
    parser.add_argument("--docs", type=Path, metavar="PAGE",
                        help=f"rewrite the params reference between the markers inside PAGE ({REFERENCE_DOC})")
    parser.add_argument("--preset", type=Path, help="merge this preset (presets/<dataset>.yaml) into --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="where the merged params go (default: print them)")
    args = parser.parse_args()
    if args.preset:
        try:
            merged = apply_preset(args.params, args.preset)
        except ConfigError as err:
            raise SystemExit(str(err)) from None
        text = yaml.safe_dump(merged, sort_keys=False)
        if args.out:
            from ctxseg.io import write_text

            write_text(args.out, text)
        else:
            sys.stdout.write(text)
    elif args.docs:
        update_reference(args.docs)
    else:
        sys.stdout.write(params_reference_markdown() + "\n")
