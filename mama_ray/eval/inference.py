"""Distributed inference over an evaluation split: Ray Data ``map_batches`` with actor pools.

Every evaluation that needs the model over many images (zero-shot scores, probe features,
retrieval embeddings) streams :func:`mama_ray.data.pipeline.build_eval_dataset` through a
callable class: each actor of the pool (``eval.concurrency`` actors, one GPU each when
``scaling.use_gpu``) loads the checkpoint once, then scores batches of ``eval.batch_size``.
Only small per-image outputs come back to the driver.
"""

from __future__ import annotations

import numpy as np
import torch

from mama_ray.config import Config
from mama_ray.data.pipeline import build_eval_dataset, build_label_dataset
from mama_ray.eval.zero_shot import caption_texts, score_batch
from mama_ray.layout import load_model_from_checkpoint
from mama_ray.models.zero_shot import text_embeddings


def actor_cpus(cluster_cpus: float, actors: int) -> float:
    """Logical CPUs each CPU inference actor reserves: 1, or less so that the pool leaves one
    CPU free for the shard-reading tasks that feed it (else a 2-CPU machine deadlocks: two
    actors hold both CPUs while the read task waits for one)."""
    return max(0.1, min(1.0, (cluster_cpus - 1.0) / actors))


def map_options(cfg: Config) -> dict:
    """``map_batches`` arguments of the inference actor pool."""
    import ray  # why: Ray only where a pool is built (the module is imported on the driver's light paths too)
    from ray.data import ActorPoolStrategy

    gpu = 1 if cfg.scaling.use_gpu else 0
    cpus = 0 if gpu else actor_cpus(ray.cluster_resources().get("CPU", 1.0), cfg.eval.concurrency)
    return {"batch_size": cfg.eval.batch_size, "compute": ActorPoolStrategy(size=cfg.eval.concurrency),
            "num_gpus": gpu, "num_cpus": cpus}


def collect(ds) -> dict[str, np.ndarray]:
    """All rows of a (small, image-free) dataset as numpy columns, sorted by ``image_id``."""
    parts = [p for p in ds.iter_batches(batch_size=None, batch_format="numpy") if len(p["image_id"])]
    if not parts:
        raise ValueError("the evaluation split is empty: no image to evaluate")
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["image_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CheckpointActor:
    """Base of the ``map_batches`` callables: loads the checkpoint once per actor."""

    def __init__(self, cfg: Config, checkpoint_uri: str):
        model, self.tokenizer, self.model_cfg, _ = load_model_from_checkpoint(checkpoint_uri)
        self.device = device()
        self.model = model.to(self.device).eval()
        self.cfg = cfg

    def images(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        # A copy: Ray Data hands out read-only arrays, which torch.from_numpy warns about.
        return torch.from_numpy(np.array(batch["image"])).to(self.device)  # B×3×S×S uint8


OUTPUTS = ("zero_shot", "embed", "image")


class Evaluator(CheckpointActor):
    """Per image, any of: zero-shot scores (``density_scores`` B×4, ``birads_scores`` B×7);
    embeddings (``pooled_image`` B×C, the probe feature; ``image_emb`` and ``text_emb`` of its
    own unmasked caption, B×E, text pooled as ``eval.text_feature``); its gray ``image`` 1×S×S."""

    def __init__(self, cfg: Config, checkpoint_uri: str, outputs: tuple[str, ...]):
        super().__init__(cfg, checkpoint_uri)
        self.outputs = outputs

    @torch.no_grad()  # grad mode is per thread: set it where the batch is processed
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: batch[k] for k in ("image_id", "density", "birads")}
        img = self.model.encode_image(self.images(batch), local=False)
        if "zero_shot" in self.outputs:
            out.update(score_batch(self.model, self.tokenizer, batch, img["image_emb"],
                                   self.model_cfg.text.max_len, self.cfg.eval.text_feature))
        if "embed" in self.outputs:
            text_emb = text_embeddings(self.model, self.tokenizer, caption_texts(batch),
                                    self.model_cfg.text.max_len, self.cfg.eval.text_feature)
            out.update({"pooled_image": img["pooled_image"].float().cpu().numpy(),
                        "image_emb": img["image_emb"].float().cpu().numpy(),
                        "text_emb": text_emb.cpu().numpy()})
        if "image" in self.outputs:
            out["image"] = np.ascontiguousarray(batch["image"][:, :1])  # the 3 channels are equal
        return out


def infer_split(cfg: Config, checkpoint_uri: str, split: str, outputs: tuple[str, ...],
                keep_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:class:`Evaluator` outputs for the images of ``split`` (only ``keep_ids`` if given),
    as numpy columns sorted by image id."""
    unknown = [o for o in outputs if o not in OUTPUTS]
    assert not unknown, unknown
    ds = build_eval_dataset(cfg, split)
    if keep_ids is not None:
        keep = set(np.asarray(keep_ids).tolist())
        ds = ds.filter(lambda row: row["image_id"] in keep)
    kwargs = {"cfg": cfg, "checkpoint_uri": checkpoint_uri, "outputs": tuple(outputs)}
    return collect(ds.map_batches(Evaluator, fn_constructor_kwargs=kwargs, **map_options(cfg)))


def split_labels(cfg: Config, split: str) -> dict[str, np.ndarray]:
    """``image_id``, ``density``, ``birads`` of every image of ``split`` (no model, no image decoded), sorted."""
    return collect(build_label_dataset(cfg, split))
