"""MamaModel: both towers, the heads and the two learnable temperatures (method.md §2).

Knows nothing of Ray or DeepSpeed: the trainer wraps it. :func:`build_model` turns a
:class:`~mama_ray.config.Config` into a model (sizes from ``cfg.model``, weights from the URIs
it names, else random init); :meth:`MamaModel.save_pretrained` / :meth:`MamaModel.from_pretrained`
round-trip it (safetensors + the config + the tokenizer) through a local folder or s3://.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mama_ray import config, storage
from mama_ray.config import Config
from mama_ray.data.tokenizer import load_tokenizer, load_tokenizer_folder, save_tokenizer
from mama_ray.models.heads import LocalImageHead, LocalTextHead, MultiViewHead
from mama_ray.models.text import TextTower, build_trunk, gather_sentences, pool_text
from mama_ray.models.vision import VisionTower, build_vit

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
INIT_SCALE = math.log(1 / 0.07)  # both temperatures start at ln(1/0.07) ≈ 2.659 (method.md §2.4)


def normalize_image(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels → (x/255 − 0.5)/0.5 (method.md §1.6); floats are taken as already normalised.

    A single gray channel (B×1×H×W) is replicated to RGB here, so only a third of the bytes
    need to travel to the device.
    """
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    if image.dtype == torch.uint8:
        return (image.to(dtype) / 255.0 - 0.5) / 0.5
    return image.to(dtype)


class MamaModel(nn.Module):
    """Vision tower, text tower (+ LoRA), global/local/multi-view heads, ``logit_scale``, ``local_scale``.

    Attributes a trainer may use: ``vision.vit`` (the Hugging Face ViT), ``text.lm`` (the trunk,
    a PEFT model when LoRA is on), ``tokenizer`` (saved with the model), ``cfg``.
    """

    def __init__(self, cfg: Config, vision: VisionTower, text: TextTower, tokenizer=None):
        super().__init__()
        m = cfg.model
        self.cfg, self.tokenizer = cfg, tokenizer
        self.vision, self.text = vision, text
        cv, ct = vision.hidden_size, text.hidden_size
        self.image_proj = nn.Linear(cv, m.emb_dim)
        self.text_proj = nn.Linear(ct, m.emb_dim)
        self.local_image_head = LocalImageHead(cv, m.local_hidden, m.local_dim)
        self.local_text_head = LocalTextHead(ct, m.local_hidden, m.local_dim)
        self.mv_head = MultiViewHead(cv, m.mv_hidden, m.emb_dim)
        # Shape [1], not a 0-dim scalar: deepspeed.initialize fails on 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), INIT_SCALE))
        self.local_scale = nn.Parameter(torch.full((1,), INIT_SCALE))

    # ---- encoders -------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor, local: bool = True) -> dict[str, torch.Tensor]:
        """Image features.

        Args:
            image: B×3×H×W (or B×1×H×W gray), uint8 (normalised here) or float already normalised.
            local: also compute ``patch_emb`` (skip it for the second view, whose patches no loss
                uses, so its batch does not move the local head's BatchNorm statistics).
        Returns:
            ``pooled_image`` B×C (pre-LN token mean), ``image_emb`` B×E (L2-normalised),
            ``mv_emb`` B×E (multi-view head output, NOT normalised: the NT-Xent normalises),
            ``patch_emb`` B×P×E′ (L2-normalised; only when ``local``).
        """
        pixels = normalize_image(image, self.image_proj.weight.dtype)
        pooled, patches = self.vision(pixels)  # B×C, B×P×C
        out = {"pooled_image": pooled,
               "image_emb": F.normalize(self.image_proj(pooled), dim=-1),
               "mv_emb": self.mv_head(pooled)}
        if local:
            out["patch_emb"] = self.local_image_head(patches)
        return out

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    sep_mask: torch.Tensor | None = None, pooling: str = "mean",
                    local: bool = True) -> dict[str, torch.Tensor]:
        """Text features.

        Args:
            input_ids, attention_mask: B×L (right-padded). sep_mask: B×L bool, separator positions.
            pooling: ``mean`` (training, method.md §2.2) or ``first_pad`` (zero-shot, method.md §5.1).
            local: also compute the sentence features (needs ``sep_mask``).
        Returns:
            ``text_emb`` B×E (L2-normalised), ``hidden`` B×L×C, and when ``local``: ``sent_emb``
            B×M×E′ (L2-normalised, zeros at padded slots), ``sent_mask`` B×M bool.
        """
        hidden = self.text(input_ids, attention_mask)  # B×L×C
        pooled = pool_text(hidden, attention_mask, pooling)  # B×C
        out = {"hidden": hidden, "text_emb": F.normalize(self.text_proj(pooled), dim=-1)}
        if local:
            if sep_mask is None:
                raise ValueError("encode_text(local=True) needs sep_mask (separator positions)")
            sent, sent_mask = gather_sentences(hidden, sep_mask)  # B×M×C, B×M
            out["sent_emb"] = self.local_text_head(sent, sent_mask)
            out["sent_mask"] = sent_mask
        return out

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sep_mask: torch.Tensor, local: bool = True) -> dict[str, torch.Tensor]:
        """Primary image + its caption → everything the objective needs.

        Returns ``image_emb``, ``text_emb`` (B×E), ``pooled_image`` (B×C), ``mv_emb`` (B×E),
        ``patch_emb`` (B×P×E′), ``sent_emb`` (B×M×E′), ``sent_mask`` (B×M), ``logit_scale``,
        ``local_scale`` (the log-scales, shape [1]). With ``local=False`` the local features
        are skipped (before the late-loss step no loss uses them).
        """
        out = self.encode_image(image, local=local)
        text = self.encode_text(input_ids, attention_mask, sep_mask,
                                pooling=self.cfg.model.text.train_pooling, local=local)
        out.update({k: v for k, v in text.items() if k != "hidden"})
        out["logit_scale"], out["local_scale"] = self.logit_scale, self.local_scale
        return out

    # ---- parameter groups -----------------------------------------------------------------

    def local_parameters(self) -> list[nn.Parameter]:
        """Local heads + ``local_scale``: the trainer freezes these until the late-loss step."""
        return [*self.local_image_head.parameters(), *self.local_text_head.parameters(), self.local_scale]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that should train (requires_grad), local ones included."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- persistence ----------------------------------------------------------------------

    def save_pretrained(self, uri: str, opts: storage.StorageOptions | None = None) -> None:
        """Write ``model.safetensors``, ``config.yaml`` and ``tokenizer/`` to a folder or s3:// prefix."""
        if storage.is_s3(uri):
            with tempfile.TemporaryDirectory() as tmp:
                self._save_local(Path(tmp))
                storage.upload_dir(tmp, uri, opts)
        else:
            self._save_local(Path(storage.filesystem(uri, opts)[1]))

    def _save_local(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(config.dump_yaml(self.cfg))
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, str(folder / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, uri: str, opts: storage.StorageOptions | None = None) -> MamaModel:
        """Load what :meth:`save_pretrained` wrote (local folder or s3://); tower weight URIs
        in the saved config are not re-read."""
        if not storage.is_s3(uri):
            return cls._load_local(Path(storage.filesystem(uri, opts)[1]), uri)
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_dir(uri, tmp, opts)
            return cls._load_local(Path(tmp), uri)

    @classmethod
    def _load_local(cls, folder: Path, uri: str) -> MamaModel:
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{uri}: no {WEIGHTS_FILE} (not a saved MamaModel)")
        cfg = config.load((folder / CONFIG_FILE).as_posix(), {
            "model.vision.weights": "", "model.text.weights": "", "text.tokenizer": ""})
        tok = load_tokenizer_folder(folder / TOKENIZER_DIR, uri) if (folder / TOKENIZER_DIR).is_dir() else None
        model = build_model(cfg, tok)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        return model


def _weights_dir(uri: str, cfg: Config, what: str) -> Path | None:
    if not uri:
        return None
    opts = storage.StorageOptions.from_config(cfg.storage)
    folder = storage.local_copy(uri, Path(cfg.storage.cache_dir) / "weights", opts)
    if not folder.is_dir():
        raise ValueError(f"model.{what}.weights {uri}: folder {folder} does not exist")
    return folder


def build_model(cfg: Config, tokenizer=None) -> MamaModel:
    """A :class:`MamaModel` sized by ``cfg.model``; towers load ``model.*.weights`` when set.

    Args:
        cfg: the run config. tokenizer: the one the data pipeline uses (its length sizes the
            text embeddings; it is saved with the model). None → the tiny caption tokenizer.
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    m = cfg.model
    vit = build_vit(m.vision, _weights_dir(m.vision.weights, cfg, "vision"))
    trunk = build_trunk(m.text, len(tokenizer), _weights_dir(m.text.weights, cfg, "text"))
    vision = VisionTower(vit, grad_ckpt=m.vision.grad_ckpt)
    text = TextTower(trunk, m.text.arch, m.lora, grad_ckpt=m.text.grad_ckpt, train_trunk=m.text.train_trunk)
    return MamaModel(cfg, vision, text, tokenizer)
