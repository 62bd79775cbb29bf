"""Evaluation runs: the tasks of ``jobs/evaluate.py`` and the zero-shot summary of a pretraining run.

``evaluate`` runs the chosen tasks on one checkpoint and writes ``metrics.json`` and the PNGs
into one output folder (local or s3://); ``run_zero_shot`` is the zero-shot part alone, which
the pretraining job calls at its end. Pictures are :mod:`mama_ray.eval.plots`, writing the results
:mod:`mama_ray.eval.outputs` (the ``metrics.json`` layout is documented in ``docs/evaluation.md``).
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from mama_ray import storage
from mama_ray.config import Config, ConfigError
from mama_ray.data.pipeline import READ_COLUMNS, eval_batch, shard_paths
from mama_ray.data.shards import iter_row_groups
from mama_ray.eval import probe
from mama_ray.eval.attention import attention_pngs
from mama_ray.eval.inference import infer_split, split_labels
from mama_ray.eval.outputs import predictions_parquet, write_outputs, zero_shot_table
from mama_ray.eval.plots import classification_pngs
from mama_ray.eval.retrieval import retrieval_metrics
from mama_ray.eval.zero_shot import task_metrics, task_rows
from mama_ray.layout import load_model_from_checkpoint
from mama_ray.models.zero_shot import TASKS

ALL_TASKS = ("zero_shot", "probe", "finetune", "retrieval", "attention")
DEFAULT_TASKS = ("zero_shot", "probe", "retrieval", "attention")


def default_out_uri(checkpoint_uri: str) -> str:
    """Where results go when no ``--out`` is given: ``<checkpoint>/eval``."""
    return storage.join(checkpoint_uri, "eval")


def eval_pass(cfg: Config, checkpoint_uri: str, outputs: tuple[str, ...]) -> tuple[dict, dict]:
    """One inference pass over the evaluation split.

    With ``eval.balanced_test`` the labels are read first and only the union of the per-task
    balanced subsets is scored.

    Returns:
        (:func:`infer_split` columns; task → image ids that task is evaluated on).
    """
    if not cfg.eval.balanced_test:
        preds = infer_split(cfg, checkpoint_uri, cfg.eval.split, outputs)
        return preds, task_rows(cfg, preds)
    ids = task_rows(cfg, split_labels(cfg, cfg.eval.split))
    keep = np.unique(np.concatenate(list(ids.values())))
    return infer_split(cfg, checkpoint_uri, cfg.eval.split, outputs, keep), ids


def zero_shot_results(preds: dict, ids: dict) -> tuple[dict, dict[str, bytes]]:
    """Zero-shot metrics per task, and the pictures + per-image predictions file."""
    metrics = task_metrics(preds, ids)
    files = {"zero_shot_predictions.parquet": predictions_parquet(preds)}
    for task in TASKS:
        rows = np.isin(preds["image_id"], ids[task])
        files.update(classification_pngs("zero_shot", task, metrics[task], preds[task][rows],
                                         preds[f"{task}_scores"][rows]))
    return metrics, files


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
    return metrics, zero_shot_table(metrics)


def settings(cfg: Config, checkpoint_uri: str) -> dict:
    """What an evaluation was run on (the head of ``metrics.json``)."""
    return {"checkpoint": checkpoint_uri, "shards": cfg.data.shards, "split": cfg.eval.split,
            "balanced_test": cfg.eval.balanced_test, "text_feature": cfg.eval.text_feature,
            "seed": cfg.run.seed}


def first_eval_rows(cfg: Config, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` evaluation rows of the split in shard order, made in this process by the
    pipeline's own map function (a handful of images needs no cluster)."""
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
