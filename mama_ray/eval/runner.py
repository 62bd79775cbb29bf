"""Evaluation runs: the tasks of ``jobs/evaluate.py`` and the zero-shot summary of a pretraining run.

``evaluate`` runs the chosen tasks on one checkpoint and writes ``metrics.json`` and the PNGs
into one output folder (local or s3://); ``run_zero_shot`` is the zero-shot part alone, which
the pretraining job calls at its end. The ``metrics.json`` layout is documented in
``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from mama_ray import storage
from mama_ray.config import Config, ConfigError
from mama_ray.eval import plots
from mama_ray.eval.metrics import softmax
from mama_ray.eval.zero_shot import CLASS_NAMES, TASKS

ALL_TASKS = ("zero_shot", "probe", "finetune", "retrieval", "attention")
DEFAULT_TASKS = ("zero_shot", "probe", "retrieval", "attention")


def default_out_uri(checkpoint_uri: str) -> str:
    """Where results go when no ``--out`` is given: ``<checkpoint>/eval``."""
    return storage.join(checkpoint_uri, "eval")


def _jsonable(value):
    """NaN → None (JSON has no NaN), numpy scalars → Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def classification_pngs(prefix: str, task: str, metrics: dict, y: np.ndarray, scores: np.ndarray) -> dict[str, bytes]:
    """Confusion matrix and ROC curves of one task: ``{file name: png}``."""
    names = CLASS_NAMES[task]
    title = f"{prefix.replace('_', ' ')} {task}: bal. acc {metrics['balanced_accuracy']:.3f}"
    return {f"{prefix}_{task}_confusion.png": plots.confusion_png(np.array(metrics["confusion_matrix"]), names, title),
            f"{prefix}_{task}_roc.png": plots.roc_png(y, softmax(scores), names, title)}


def eval_pass(cfg: Config, checkpoint_uri: str, outputs: tuple[str, ...]) -> tuple[dict, dict]:
    """One inference pass over the evaluation split.

    With ``eval.balanced_test`` the labels are read first and only the union of the per-task
    balanced subsets is scored.

    Returns:
        (:func:`infer_split` columns; task → image ids that task is evaluated on).
    """
    from mama_ray.eval.inference import infer_split, split_labels
    from mama_ray.eval.zero_shot import task_rows

    if not cfg.eval.balanced_test:
        preds = infer_split(cfg, checkpoint_uri, cfg.eval.split, outputs)
        return preds, task_rows(cfg, preds)
    ids = task_rows(cfg, split_labels(cfg, cfg.eval.split))
    keep = np.unique(np.concatenate(list(ids.values())))
    return infer_split(cfg, checkpoint_uri, cfg.eval.split, outputs, keep), ids


def zero_shot_results(preds: dict, ids: dict) -> tuple[dict, dict[str, bytes]]:
    """Zero-shot metrics per task, and the pictures + per-image predictions file."""
    from mama_ray.eval.zero_shot import task_metrics

    metrics = task_metrics(preds, ids)
    files = {"zero_shot_predictions.parquet": predictions_parquet(preds)}
    for task in TASKS:
        rows = np.isin(preds["image_id"], ids[task])
        files.update(classification_pngs("zero_shot", task, metrics[task], preds[task][rows],
                                         preds[f"{task}_scores"][rows]))
    return metrics, files


def predictions_parquet(preds: dict) -> bytes:
    """Per-image labels and zero-shot scores (τ·cos) as Parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: pa.array(preds[k]) for k in ("image_id", "density", "birads")}
    for task in TASKS:
        scores = np.ascontiguousarray(preds[f"{task}_scores"], dtype=np.float32)  # N×K
        cols[f"{task}_scores"] = pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), scores.shape[1])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue().to_pybytes()


def format_table(metrics: dict) -> str:
    """The zero-shot summary table (one line per task)."""
    from mama_ray.eval.zero_shot import NUM_CLASSES

    lines = [f"{'zero-shot':<10}{'n':>7}{'acc':>8}{'bal.acc':>9}{'AUC':>8}{'chance':>8}"]
    for task in TASKS:
        m = metrics[task]
        lines.append(f"{task:<10}{m['n']:>7}{m['accuracy']:>8.3f}{m['balanced_accuracy']:>9.3f}"
                     f"{m['auc']:>8.3f}{1 / NUM_CLASSES[task]:>8.3f}")
    return "\n".join(lines)


def write_outputs(out_uri: str, metrics: dict, files: dict[str, bytes], opts: storage.StorageOptions) -> None:
    """``metrics.json`` and every file (names may contain one sub-folder) under ``out_uri``."""
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data, opts)
    text = json.dumps(_jsonable(metrics), indent=1, allow_nan=False)
    storage.write_bytes(storage.join(out_uri, "metrics.json"), text.encode(), opts)


def run_zero_shot(cfg: Config, checkpoint_uri: str, out_uri: str | None = None) -> tuple[dict, str]:
    """Zero-shot BI-RADS and density on ``cfg.eval.split`` of ``cfg.data.shards``.

    Returns:
        ``(metrics, table)``: ``metrics["density"|"birads"]`` hold ``n``, ``accuracy``,
        ``balanced_accuracy``, ``auc``, ``per_class_recall``, ``support``, ``confusion_matrix``;
        ``table`` is the printable summary. With ``out_uri``, ``metrics.json`` (``{"zero_shot":
        metrics, …}``), the PNGs and ``zero_shot_predictions.parquet`` are written there.
    """
    metrics, files = zero_shot_results(*eval_pass(cfg, checkpoint_uri, ("zero_shot",)))
    if out_uri:
        write_outputs(out_uri, {**settings(cfg, checkpoint_uri), "zero_shot": metrics}, files,
                      storage.StorageOptions.from_config(cfg.storage))
    return metrics, format_table(metrics)


def settings(cfg: Config, checkpoint_uri: str) -> dict:
    """What an evaluation was run on (the head of ``metrics.json``)."""
    return {"checkpoint": checkpoint_uri, "shards": cfg.data.shards, "split": cfg.eval.split,
            "balanced_test": cfg.eval.balanced_test, "text_feature": cfg.eval.text_feature,
            "seed": cfg.run.seed}


def first_eval_rows(cfg: Config, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` evaluation rows of the split in shard order, made in this process by the
    pipeline's own map function (a handful of images needs no cluster)."""
    import pyarrow.compute as pc

    from mama_ray.data.pipeline import READ_COLUMNS, eval_batch, shard_paths
    from mama_ray.data.shards import iter_row_groups

    fs, files = shard_paths(cfg.data.shards, storage.StorageOptions.from_config(cfg.storage))
    parts, count, size = [], 0, cfg.data.map_batch_size
    for path in files:
        for group in iter_row_groups(fs, path, READ_COLUMNS):
            for table in (group.slice(i, size) for i in range(0, group.num_rows, size)):
                batch = eval_batch(table.filter(pc.equal(table["split"], cfg.eval.split)), cfg)
                parts.append(batch)
                count += len(batch["image_id"])
                if count >= n:
                    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def attention(cfg: Config, checkpoint_uri: str) -> tuple[dict, dict[str, bytes]]:
    """Sentence→patch heatmaps of the first ``eval.attention_images`` images of the split."""
    from mama_ray.eval.attention import attention_pngs
    from mama_ray.train.checkpoint import load_model_from_checkpoint

    batch = first_eval_rows(cfg, cfg.eval.attention_images)
    if not batch or not len(batch["image_id"]):
        return {"images": []}, {}
    model, tokenizer, _, _ = load_model_from_checkpoint(checkpoint_uri)
    pngs = attention_pngs(model, tokenizer, batch)
    return {"images": list(pngs)}, {f"attention/{k}.png": v for k, v in pngs.items()}


def check_tasks(tasks: list[str]) -> list[str]:
    """``tasks`` if every one is known; else a ConfigError listing the valid ones (``--tasks`` is an
    argument of the job, not a config field: the message names the tasks, no field)."""
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"evaluation tasks {unknown or tasks}: choose from {', '.join(ALL_TASKS)}")
    return list(tasks)


def evaluate(cfg: Config, checkpoint_uri: str, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
             out_uri: str | None = None) -> dict:
    """Run ``tasks`` (of ``ALL_TASKS``) on a checkpoint; write ``metrics.json`` + files to ``out_uri``.

    One inference pass over the evaluation split serves zero-shot, retrieval and the probes' test
    features; one over the training split serves the probes' training data.

    Returns:
        the metrics dict written (layout: docs/evaluation.md).
    """
    from mama_ray.eval import probe
    from mama_ray.eval.inference import infer_split
    from mama_ray.eval.retrieval import retrieval_metrics

    tasks = check_tasks(list(tasks))
    out_uri = out_uri or default_out_uri(checkpoint_uri)
    metrics, files = settings(cfg, checkpoint_uri), {}
    wanted = {"zero_shot": "zero_shot", "probe": "embed", "retrieval": "embed", "finetune": "image"}
    test_outputs = tuple(sorted({wanted[t] for t in tasks if t in wanted}))
    if test_outputs:
        preds, ids = eval_pass(cfg, checkpoint_uri, test_outputs)
    if "zero_shot" in tasks:
        metrics["zero_shot"], zs_files = zero_shot_results(preds, ids)
        files.update(zs_files)
    if "retrieval" in tasks:
        metrics["retrieval"] = retrieval_metrics(preds["image_emb"], preds["text_emb"], cfg.eval.retrieval_k)
    train_outputs = tuple(sorted({wanted[t] for t in tasks if t in ("probe", "finetune")}))
    if train_outputs:
        train = infer_split(cfg, checkpoint_uri, "train", train_outputs)
    if "probe" in tasks:
        metrics["linear_probe"] = probe.linear_probe_metrics(cfg, train, preds, ids)
    if "finetune" in tasks:
        metrics["finetune"] = probe.finetune_metrics(cfg, checkpoint_uri, train, preds, ids)
    if "attention" in tasks:
        metrics["attention"], att_files = attention(cfg, checkpoint_uri)
        files.update(att_files)
    metrics["files"] = sorted(files)
    write_outputs(out_uri, metrics, files, storage.StorageOptions.from_config(cfg.storage))
    return metrics


WHICH = ("latest", "best")


def resolve_checkpoint(uri: str, which: str = "latest") -> str:
    """A checkpoint folder as given, or a run folder's newest (``latest``) or ``best`` checkpoint.

    The best is the one ``train.best_metric`` picked during training (``<run>/best``,
    :mod:`mama_ray.train.best`); the latest is what a resume uses.

    Raises:
        StorageError: neither a checkpoint (``train_state.json``) nor a run with checkpoints, or
            ``best`` asked of a run without one (trained without validation).
    """
    from mama_ray.train.best import best_checkpoint
    from mama_ray.train.checkpoint import latest_checkpoint

    if which not in WHICH:
        raise ValueError(f"which={which!r}: choose from {', '.join(WHICH)}")
    if storage.exists(storage.join(uri, "train_state.json")):
        return uri
    if which == "best":
        best = best_checkpoint(uri) if storage.exists(uri) else None
        if best is None:
            raise storage.StorageError(f"{uri}: no best checkpoint (best/best.json) in this run folder; it is "
                                       "written by validation during training (train.val_every > 0)")
        return best
    latest = latest_checkpoint(uri) if storage.exists(uri) else None
    if latest is None:
        raise storage.StorageError(f"{uri}: not a checkpoint folder and no checkpoint_* folder inside")
    return latest


def eval_config(checkpoint_uri: str, name: str | None, overrides: list[str]) -> Config:
    """``name`` (preset/YAML) or else the checkpoint's own ``config.yaml``, with overrides."""
    from mama_ray.config import load

    return load(name or storage.join(checkpoint_uri, "config.yaml"), overrides)
