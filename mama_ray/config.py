"""The one typed config tree of mama-ray.

A run is described by one YAML file (a shipped preset from ``mama_ray/configs`` or the user's own)
plus dotted overrides (``--set model.lora.r=16``). Loading is strict: an unknown key, a wrong type
or a value outside a field's choices raises :class:`ConfigError` naming the field and what is valid,
before anything starts. The same :func:`apply_overrides` serves the CLI and Ray Tune.

Each field carries a one-line comment; ``docs/config.md`` is generated from them
(``python -m mama_ray.config --doc``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A user-caused config problem (the jobs print it and exit 2).

    Every check of a field raises it with ``path``, the dotted field name, and reads
    ``config field '<path>': <problem>`` — the one format, whichever module checks. Without a
    path the message is ``problem`` alone: for what names no one field (a file that is not YAML,
    an override that is not ``a.b=v``, an unknown preset file).
    """

    def __init__(self, problem: str, path: str = ""):
        super().__init__(f"config field '{path}': {problem}" if path else problem)
        self.problem, self.path = problem, path

    def __reduce__(self):  # unpickled (from a Ray worker) with its field, not the message as the problem
        return type(self), (self.problem, self.path)


# --------------------------------------------------------------------------------------------
# Sections. Field comments are the documentation: keep one per field.
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "mama-tiny"  # run name: the folder under storage.run_dir; same name = resume
    seed: int = 42  # global seed for model init, data order, augmentation and masking


@dataclass
class StorageConfig:
    run_dir: str = "~/.cache/mama-ray/runs"  # URI (path, file://, s3://) holding run folders
    cache_dir: str = "~/.cache/mama-ray"  # local folder for the default synthetic data set
    endpoint_url: str = ""  # S3-compatible endpoint (else AWS_ENDPOINT_URL, else AWS)
    region: str = ""  # S3 region; empty = the AWS chain (env, profile), else the bucket's own
    retries: int = 5  # attempts per S3 request (pyarrow's and botocore's standard retry, the only retry layer)


@dataclass
class IngestConfig:
    long_side: int = 1024  # stored images are resized so their long side is this many px
    scaling: Literal["voi", "minmax"] = "voi"  # voi: modality+VOI LUT/window; minmax: original's 255/max
    crop: bool = True  # crop to the breast (Otsu foreground bounding box) before resizing
    codec: Literal["png"] = "png"  # lossless codec of the stored images
    shard_mb: int = 256  # target shard size in MB (a study never spans two shards)
    row_group_studies: int = 64  # studies per Parquet row group
    studies_per_shard: int = 0  # planned studies per shard; 0 = estimated from shard_mb and long_side
    concurrency: int = 0  # most ingest tasks (a few studies each) at once (caps S3 load); 0 = as CPUs allow
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of every ingest task, e.g. {ingest_cpu: 1}
    pseudonym_key: str = ""  # HMAC key for ids and paths: env:NAME or a key file / s3:// URI (never the key itself)
    keep_source_paths: bool = False  # store each image's full input URI; false = its path relative to --dicoms, pseudonymised
    admit_non_mg: bool = False  # folder mode: ingest non-mammography modalities instead of quarantining
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test, by patient


@dataclass
class DataConfig:
    shards: str = ""  # URI of the ingested shards; empty = the default synthetic set in cache_dir
    synthetic_studies: int = 64  # studies generated for the default synthetic set
    image_size: int = 518  # side of the square training image (method.md §1.6)
    second_view_prob: float = 0.5  # probability that x2 is another image of the same study (method.md §1.5)
    plan_window: int = 512  # samples per ordering window of a rank (at least; one map task reads and emits one)
    augment: bool = True  # SimCLR-style train augmentation (method.md §1.6); false = eval transform
    map_batch_size: int = 16  # samples per map-task output batch, at least (training ones end on micro-batch boundaries)
    view_cache_mb: int = 256  # per map task: decoded, cropped, resized images kept for their study's other pairs (0 = none)
    map_concurrency: int = 0  # parallel preprocessing tasks; 0 = let Ray Data decide
    num_cpus_per_map: float = 1.0  # CPUs each preprocessing task reserves
    map_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each preprocessing task reserves, e.g. {ingest_cpu: 1}: runs them on the nodes that have them
    prefetch_batches: int = 2  # Ray Data blocks prefetched by each training rank's iterator
    prefetch_next_epoch: bool = True  # start the next epoch's stream 3/4 through this one (hides its startup)
    block_mb: int = 32  # Ray Data target block size in MB (bounds each read/map object in the store)


@dataclass
class TextConfig:
    max_len: int = 144  # tokens per caption after BOS/EOS and right padding (method.md §1.3)
    mask_meta: float = 0.8  # per-field probability of masking a meta field in training (method.md §1.4)
    tokenizer: str = ""  # URI of a Hugging Face tokenizer folder; empty = build the tiny one offline


@dataclass
class VisionTowerConfig:
    weights: str = ""  # URI of Hugging Face-format Dinov2WithRegisters weights; empty = random init
    image_size: int = 518  # input side the position embedding is built for
    patch_size: int = 14  # ViT patch size
    hidden_size: int = 768  # ViT width
    num_layers: int = 12  # ViT depth
    num_heads: int = 12  # attention heads
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio × width
    num_registers: int = 4  # register tokens
    grad_ckpt: bool = False  # activation checkpointing of the ViT blocks


@dataclass
class TextTowerConfig:
    arch: Literal["gpt2", "bert"] = "gpt2"  # GPT-2-family causal LM (BioMedLM) or a BERT-family encoder
    weights: str = ""  # URI of Hugging Face-format weights; empty = random init
    hidden_size: int = 2560  # width
    num_layers: int = 32  # depth
    num_heads: int = 20  # attention heads
    max_positions: int = 1024  # position embeddings
    vocab_size: int = 0  # vocabulary before added tokens; 0 = the tokenizer's
    grad_ckpt: bool = False  # HF gradient checkpointing of the trunk
    train_pooling: Literal["mean", "first_pad"] = "mean"  # global text feature in training (method.md §2.2)
    train_trunk: bool = False  # also train every trunk weight, embeddings included (the method freezes the pretrained trunk; for a random-init trunk)


@dataclass
class LoraConfig:
    enabled: bool = True  # LoRA on the text tower; false = text trunk fully frozen
    r: int = 8  # LoRA rank
    alpha: int = 32  # LoRA alpha (scale = alpha / r)
    dropout: float = 0.1  # LoRA dropout
    targets: list[str] = field(default_factory=lambda: ["c_attn"])  # module names LoRA wraps


@dataclass
class ModelConfig:
    preset: Literal["tiny", "base", "custom"] = "tiny"  # named sizes; keys set here override the preset
    emb_dim: int = 512  # global embedding size (image/text projections)
    local_dim: int = 512  # local (SLA) embedding size
    local_hidden: int = 2048  # hidden width of the local projection MLPs
    mv_hidden: int = 768  # hidden width of the multi-view (SimCLR) head
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    clip_weight: float = 1.0  # L_clip(V1, U), always on
    clip2_weight: float = 1.0  # L_clip(V2, U), second view against the primary caption
    mv_weight: float = 1.0  # multi-view NT-Xent
    sla_weight: float = 1.0  # symmetric local alignment
    late_loss_step: int = 8000  # optimizer step from which clip2/mv/sla join (method.md §3)
    ntxent_temperature: float = 0.5  # NT-Xent temperature (fixed)
    gather_ntxent: bool = True  # all-gather NT-Xent features across ranks with gradient


@dataclass
class OptimConfig:
    lr: float = 4e-5  # peak learning rate
    min_lr: float = 1e-8  # start and end of the warm-up + cosine schedule
    warmup_steps: int = 4000  # linear warm-up, in optimizer steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # applied to every trainable parameter (method.md §4)
    decay_all: bool = True  # true: decay biases/norms/scales too (paper); false: only ≥2-D weights
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (paper)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 0–3
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPUs reserved per training worker
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources


@dataclass
class TrainConfig:
    max_steps: int = 40000  # optimizer steps of the run (end of the cosine schedule)
    micro_batch_size: int = 36  # samples per worker per forward pass
    grad_accum: int = 2  # micro-batches per optimizer step
    log_every: int = 10  # optimizer steps between metric reports
    report_poll_s: float = 0.5  # seconds between Ray Train's collections of worker reports (Ray's default 2)
    checkpoint_every: int = 1000  # optimizer steps between checkpoints
    keep_checkpoints: int = 3  # checkpoints kept (latest K)
    max_failures: int = 3  # worker-group restarts Ray Train allows (-1 = unlimited)
    eval_at_end: bool = True  # run the zero-shot evaluation when training ends
    stop_at_step: int = 0  # end this launch cleanly (with a checkpoint) after this step; 0 = at max_steps
    val_every: int = 1000  # optimizer steps between validations on the val split (and at the end); 0 = off
    best_metric: str = "val_loss"  # validation metric that picks the best checkpoint (kept under <run>/best)
    best_mode: Literal["min", "max"] = "min"  # whether best_metric is minimised or maximised


@dataclass
class EvalConfig:
    text_feature: Literal["first_pad", "mean"] = "first_pad"  # zero-shot text feature (method.md §5.1)
    balanced_test: bool = True  # evaluate on a class-balanced subset of the test split
    split: Literal["train", "val", "test"] = "test"  # split evaluated
    batch_size: int = 32  # inference batch size
    probe_steps: int = 8000  # linear-probe / fine-tune optimizer steps (method.md §5.3)
    probe_lr: float = 5e-4  # probe SGD learning rate
    probe_batch_size: int = 36  # probe batch size
    probe_warmup_steps: int = 100  # probe linear warm-up steps (then cosine to probe_min_lr)
    probe_min_lr: float = 1e-5  # probe learning rate at the end of the cosine
    probe_weight_decay: float = 1e-3  # probe SGD weight decay
    probe_momentum: float = 0.9  # probe SGD momentum
    concurrency: int = 2  # inference actors of the Ray Data map_batches pool (one GPU each if scaling.use_gpu)
    data_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # probe data shares
    retrieval_k: list[int] = field(default_factory=lambda: [1, 5, 10])  # recall@K for retrieval
    attention_images: int = 4  # images drawn with sentence→patch heatmaps
    val_zero_shot: bool = False  # also report zero-shot density/BI-RADS balanced accuracy at each validation


@dataclass
class TuneConfig:
    space: str = "tiny"  # named search space in mama_ray/search_spaces.py
    search: Literal["random", "optuna"] = "random"  # sampler: seeded random, or Optuna's TPE (OptunaSearch); ASHA stops trials either way
    num_samples: int = 4  # trials
    metric: str = "val_clip_loss"  # metric ASHA and best_config.yaml rank trials by (unweighted: the loss_weights space cannot scale it)
    mode: Literal["min", "max"] = "min"  # whether the metric is minimised or maximised
    grace_period: int = 2  # reports before ASHA may stop a trial
    reduction_factor: int = 2  # ASHA halving rate
    max_concurrent: int = 1  # trials running at once
    driver_cpus: float = 0.25  # CPUs a trial's driver reserves (its TorchTrainer reserves the workers)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# Model sizes by name. The paper's `base`: DINOv2 ViT-B/14 reg4 at 518 + BioMedLM-class GPT-2.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "emb_dim": 32,
        "local_dim": 32,
        "local_hidden": 64,
        "mv_hidden": 32,
        "vision": {"image_size": 64, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                   "num_heads": 2, "mlp_ratio": 2, "num_registers": 4},
        "text": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_positions": 256},
        "lora": {"r": 4, "alpha": 16},
    },
    "base": {},  # the dataclass defaults are the paper's setup
}


# --------------------------------------------------------------------------------------------
# Building from plain data, strictly.
# --------------------------------------------------------------------------------------------


def _fail(path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(msg, path)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one leaf value against its annotation."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            _fail(path, f"{value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce(value, [a for a in get_args(tp) if a is not type(None)][0], path)
    if origin is list:
        if not isinstance(value, list | tuple):
            _fail(path, f"expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(path, f"expected a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .nan / .inf; no field means anything by them
            _fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None:
            _fail(path, f"expected a string, got {value!r}")
        return str(value) if isinstance(value, int | float) else value
    if not isinstance(value, tp):
        _fail(path, f"expected {tp.__name__}, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(path or "<root>", f"expected a mapping of fields, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        _fail(where, f"unknown key; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, sub) if dataclasses.is_dataclass(tp) else _coerce(value, tp, sub)
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config`; the model preset's sizes fill unset model keys."""
    data = dict(data or {})
    model = data.get("model") or {}
    if not isinstance(model, dict):
        _fail("model", f"expected a mapping of fields, got {model!r}")
    preset = model.get("preset", ModelConfig.preset)
    if preset not in MODEL_PRESETS and preset != "custom":
        _fail("model.preset", f"{preset!r} is not one of {list(MODEL_PRESETS) + ['custom']}")
    data["model"] = _deep_merge(MODEL_PRESETS.get(preset, {}), model)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped preset name (``tiny_cpu``, ``base``) or a path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped preset ({', '.join(names)})")


def load_yaml_text(text: str, origin: str = "<string>") -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return data


def load(name_or_path: str = "tiny_cpu", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (preset name or path, local or s3:// URI) and apply dotted overrides."""
    if "://" in name_or_path and not name_or_path.startswith("file://"):
        from mama_ray.storage import read_bytes  # why: pyarrow (storage) only for a remote config

        data = load_yaml_text(read_bytes(name_or_path).decode(), name_or_path)
    else:
        path = resolve_config_path(name_or_path.removeprefix("file://"))
        data = load_yaml_text(path.read_text(), str(path))
    return from_dict(apply_overrides(data, overrides or []))


# --------------------------------------------------------------------------------------------
# Dotted overrides: one function for the CLI (`--set a.b=v`) and Tune (`{"a.b": v}`).
# --------------------------------------------------------------------------------------------


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` → ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _check_path(keys: list[str]) -> None:
    """Fail early on a dotted name that names no field, listing the valid ones."""
    cls: Any = Config
    for i, k in enumerate(keys):
        path = ".".join(keys[: i + 1])
        if not dataclasses.is_dataclass(cls):
            if get_origin(cls) is dict:
                return
            _fail(path, "is not a section; it has no sub-fields")
        names = [f.name for f in dataclasses.fields(cls)]
        if k not in names:
            _fail(path, f"unknown key; valid keys here: {', '.join(names)}")
        cls = _hints(cls)[k]


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (not yet validated)."""
    items = parse_set(overrides) if isinstance(overrides, list) else dict(overrides)
    out = _deep_merge({}, data)
    for dotted, value in items.items():
        keys = dotted.split(".")
        _check_path(keys)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def override(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """A new validated config: ``cfg`` with dotted overrides applied."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))


# --------------------------------------------------------------------------------------------
# Cross-field checks.
# --------------------------------------------------------------------------------------------


def _value(cfg: Config, path: str) -> Any:
    v: Any = cfg
    for k in path.split("."):
        v = getattr(v, k)
    return v


def _positive(cfg: Config, *paths: str) -> None:
    for p in paths:
        if (v := _value(cfg, p)) <= 0:
            _fail(p, f"must be > 0, got {v!r}")


def _non_negative(cfg: Config, *paths: str) -> None:
    for p in paths:
        if (v := _value(cfg, p)) < 0:
            _fail(p, f"must be >= 0, got {v!r}")


def _probability(cfg: Config, *paths: str) -> None:
    for p in paths:
        if not 0.0 <= (v := _value(cfg, p)) <= 1.0:
            _fail(p, f"must be a probability in [0, 1], got {v!r}")


def validate(cfg: Config) -> None:
    """Checks that span fields or ranges; types and choices are checked while building."""
    _positive(cfg, "train.max_steps", "train.micro_batch_size", "train.grad_accum",
              "train.log_every", "train.report_poll_s", "train.checkpoint_every", "train.keep_checkpoints",
              "scaling.num_workers", "text.max_len", "data.image_size", "ingest.long_side", "data.block_mb",
              "model.lora.r", "optim.lr", "data.map_batch_size", "ingest.shard_mb", "data.plan_window",
              "storage.retries")
    if not all(isinstance(v, int | float) and v > 0 for v in cfg.data.map_resources.values()):
        _fail("data.map_resources", f"needs positive amounts per resource, got {cfg.data.map_resources!r}")
    _probability(cfg, "data.second_view_prob", "text.mask_meta", "model.lora.dropout")
    # Settings that can only diverge or undo the objective are refused, not trained into NaN.
    _positive(cfg, "loss.ntxent_temperature", "optim.eps")
    _non_negative(cfg, "data.view_cache_mb")
    _non_negative(cfg, "loss.clip_weight", "loss.clip2_weight", "loss.mv_weight", "loss.sla_weight",
                  "optim.min_lr", "optim.weight_decay", "optim.grad_clip")
    if cfg.optim.min_lr > cfg.optim.lr:
        _fail("optim.min_lr", f"{cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        _fail("optim.betas", f"each beta must be in [0, 1), got {cfg.optim.betas!r}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        _fail("deepspeed.zero_stage", f"{cfg.deepspeed.zero_stage} is not one of [0, 1, 2, 3]")
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        _fail("deepspeed.offload_param", "needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        _fail("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
    if len(cfg.optim.betas) != 2:
        _fail("optim.betas", f"needs two values, got {cfg.optim.betas!r}")
    _positive(cfg, "eval.batch_size", "eval.probe_steps", "eval.probe_batch_size", "eval.concurrency")
    if not cfg.eval.data_fractions or not all(0.0 < f <= 1.0 for f in cfg.eval.data_fractions):
        _fail("eval.data_fractions", f"needs shares in (0, 1], got {cfg.eval.data_fractions!r}")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        _fail("optim.warmup_steps", f"{cfg.optim.warmup_steps} exceeds train.max_steps={cfg.train.max_steps}")
    if any(v <= 0 for v in cfg.ingest.resources.values()):
        _fail("ingest.resources", f"needs positive amounts, got {cfg.ingest.resources!r}")
    if cfg.ingest.concurrency < 0:
        _fail("ingest.concurrency", f"must be ≥ 0, got {cfg.ingest.concurrency!r}")
    fr = cfg.ingest.split_fractions
    if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6 or min(fr) < 0:
        _fail("ingest.split_fractions", f"needs three non-negative shares summing to 1, got {fr!r}")
    v = cfg.model.vision
    _check_validation(cfg)
    if v.image_size % v.patch_size:
        _fail("model.vision.image_size", f"{v.image_size} is not a multiple of patch_size {v.patch_size}")
    if cfg.model.text.hidden_size % cfg.model.text.num_heads:
        _fail("model.text.hidden_size", "must be a multiple of model.text.num_heads")
    if v.hidden_size % v.num_heads:
        _fail("model.vision.hidden_size", "must be a multiple of model.vision.num_heads")


VAL_LOSS_METRICS = ("val_loss", "val_clip_loss", "val_clip2_loss", "val_mv_loss", "val_sla_loss")
VAL_RETRIEVAL_METRICS = ("val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5")
VAL_ZERO_SHOT_METRICS = ("val_density_balanced_accuracy", "val_birads_balanced_accuracy")


def val_metrics(cfg: Config) -> tuple[str, ...]:
    """The metrics each validation reports (mama_ray.train.validate), given the config."""
    return VAL_LOSS_METRICS + VAL_RETRIEVAL_METRICS + (VAL_ZERO_SHOT_METRICS if cfg.eval.val_zero_shot else ())


def _check_validation(cfg: Config) -> None:
    if cfg.train.val_every < 0:
        _fail("train.val_every", f"must be >= 0 (0 = no validation), got {cfg.train.val_every}")
    if cfg.train.best_metric not in val_metrics(cfg):
        _fail("train.best_metric", f"{cfg.train.best_metric!r} is not a validation metric; choose from "
              f"{', '.join(val_metrics(cfg))}" + ("" if cfg.eval.val_zero_shot else
                                                  " (zero-shot ones need eval.val_zero_shot=true)"))


def stop_step(cfg: Config) -> int:
    """The optimizer step this launch ends at: ``train.stop_at_step`` when it cuts the run short, else ``max_steps``."""
    s = cfg.train.stop_at_step
    return s if 0 < s < cfg.train.max_steps else cfg.train.max_steps


def check_probe_schedule(ecfg: EvalConfig) -> None:
    """The probe's warm-up fits in its steps (checked where a probe runs: only evaluation needs it)."""
    if ecfg.probe_warmup_steps > ecfg.probe_steps:
        _fail("eval.probe_warmup_steps", f"{ecfg.probe_warmup_steps} exceeds eval.probe_steps={ecfg.probe_steps}")


ZERO_SHOT_PREFIX = "zero_shot_"  # metrics only the end-of-trial evaluation reports
VAL_PREFIX = "val_"  # metrics only validation steps report


def check_tune_settings(cfg: Config) -> None:
    """The ``tune`` section against the rest of the config (checked by a sweep, before Ray starts).

    The checks that need the search space's Tune domains are in :mod:`mama_ray.sweep`.
    """
    t = cfg.tune
    _positive(cfg, "tune.num_samples", "tune.grace_period", "tune.max_concurrent")
    if t.reduction_factor < 2:
        _fail("tune.reduction_factor", f"must be >= 2, got {t.reduction_factor}")
    if t.metric.startswith(ZERO_SHOT_PREFIX) and not cfg.train.eval_at_end:
        _fail("tune.metric", f"{t.metric!r} is reported by the end-of-trial zero-shot evaluation; "
              "set train.eval_at_end=true")
    if t.metric.startswith(VAL_PREFIX):
        if t.metric not in val_metrics(cfg):
            _fail("tune.metric", f"{t.metric!r} is not a validation metric; choose from {', '.join(val_metrics(cfg))}")
        if cfg.train.val_every == 0:
            _fail("tune.metric", f"{t.metric!r} is reported by validation during training, which "
                  "train.val_every=0 turns off; set train.val_every > 0")
        if cfg.train.val_every >= stop_step(cfg):
            warnings.warn(f"train.val_every={cfg.train.val_every} ≥ the trial's {stop_step(cfg)} steps: "
                          f"{t.metric} is reported once, at the end, so ASHA cannot stop a trial early; "
                          "lower train.val_every", stacklevel=2)


# --------------------------------------------------------------------------------------------
# CLI helpers shared by the jobs.
# --------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, default: str = "tiny_cpu") -> None:
    parser.add_argument("--config", default=default,
                        help=f"preset name ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}) or YAML path/URI")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v",
                        help="override a config field (repeatable), e.g. --set model.lora.r=16")


def load_from_args(args: argparse.Namespace) -> Config:
    """Load the config named on the command line; on a user error print it and exit 2."""
    try:
        return load(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _doc_lines(cls: type, prefix: str) -> list[str]:
    source = inspect.getsource(cls)  # this class's own lines: field names repeat across sections
    lines = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines += _doc_lines(tp, path + ".")
            continue
        comment = ""
        for line in source.splitlines():
            s = line.strip()
            if s.startswith(f"{f.name}:") and "#" in s:
                comment = s.split("#", 1)[1].strip()
                break
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"| `{path}` | `{default!r}` | {comment} |")
    return lines


def markdown_reference() -> str:
    """The field table of docs/config.md, from the comments in this file."""
    head = "| field | default | meaning |\n|---|---|---|\n"
    return head + "\n".join(_doc_lines(Config, "")) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Show or document the mama-ray config.")
    add_config_args(ap)
    ap.add_argument("--doc", action="store_true", help="print the markdown field reference")
    a = ap.parse_args()
    print(markdown_reference() if a.doc else dump_yaml(load_from_args(a)), end="")
