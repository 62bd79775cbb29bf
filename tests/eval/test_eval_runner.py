"""``evaluate`` end to end on tiny shards: probes, fine-tuning, retrieval and attention maps
write metrics.json and decodable, non-trivial PNGs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mama_ray import config
from mama_ray.eval import evaluate


def _png(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 10  # not a blank canvas
    return img


@pytest.fixture(scope="module")
def evaluated(ray_session, eval_cfg, tiny_checkpoint, tmp_path_factory):
    cfg = config.override(eval_cfg, {"eval.probe_steps": 4, "eval.probe_warmup_steps": 1,
                                     "eval.probe_batch_size": 8, "eval.data_fractions": [0.1, 1.0],
                                     "eval.attention_images": 2})
    out = tmp_path_factory.mktemp("eval_out")
    metrics = evaluate(cfg, tiny_checkpoint, ["probe", "finetune", "retrieval", "attention"], str(out))
    return metrics, out


def test_metrics_json_has_every_task(evaluated, split_image_ids):
    metrics, out = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["checkpoint"] and saved["split"] == "test"
    n = len(split_image_ids)
    for kind in ("linear_probe", "finetune"):
        for task, classes in (("density", 4), ("birads", 7)):
            m = saved[kind][task]["1"]
            assert m["n"] == n and len(m["confusion_matrix"]) == classes
            assert sum(map(sum, m["confusion_matrix"])) == n
            assert saved[kind][task]["0.1"]["train_images"] < m["train_images"]
    r = saved["retrieval"]
    assert r["n"] == n
    assert 0.0 <= r["image_to_text"]["R@1"] <= r["image_to_text"]["R@5"] <= r["image_to_text"]["R@10"] <= 1.0
    assert metrics["retrieval"] == r


def test_attention_pngs_differ_per_image(evaluated):
    metrics, out = evaluated
    names = metrics["attention"]["images"]
    assert len(names) == 2
    a, b = (_png((out / "attention" / f"{n}.png").read_bytes()) for n in names)
    assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 1
