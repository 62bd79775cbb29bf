"""Structured captions, meta masking and zero-shot prompts (method.md §1.3, §1.4, method.md §5.1).

The literal phrases here are part of the method: zero-shot prompts reuse the training template,
so change nothing without changing both. A caption is built in two steps:

1. :func:`caption_text` — the human-readable caption from a :class:`CaptionFields`, with the meta
   fields named in ``masked`` replaced by ``unknown``;
2. :func:`to_model_text` — newlines → spaces, every ``.`` and ``;`` → the separator token (the
   "sentences" of local alignment), wrapped in BOS/EOS. Padding to ``text.max_len`` is the
   tokenizer's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD = "<|padtext|>"
SEP = "<|separatetext|>"
MASK = "<|masktext|>"
UNK = "<|unknowntext|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SEP, MASK, UNK)

BIRADS_LETTERS = "ANBPSMK"  # class id = index; "Category n" uses the same number
META_FIELDS = ("age", "race", "ethnicity", "type", "side", "view")  # masked with p = text.mask_meta

DENSITY_TEXT = {
    1: "almost entirely fat",
    2: "scattered fibroglandular densities",
    3: "heterogeneously dense",
    4: "extremely dense",
    5: "normal male dense",
}
DENSITY_WARNING = "This may lower the sensitivity of mammography. "
BIRADS_DESC = dict(zip(BIRADS_LETTERS, (
    "additional imaging required", "negative", "benign finding", "probably benign finding",
    "suspicious abnormality", "highly suggestive of malignancy", "known biopsy-proven malignancy",
), strict=True))
ASSESS = dict(zip(BIRADS_LETTERS, (
    "Additional imaging is recommended", "Negative", "Benign", "Probably benign",
    "Suspicious abnormality", "Highly suggestive of malignancy", "Known biopsy-proven malignancy",
), strict=True))
MASS_TEXT = dict(zip(BIRADS_LETTERS, (
    "an additional imaging is recommended.",
    "no significant masses, calcification, or other abnormalities are present.",
    "a benign finding is present.",
    "a probably benign finding is present.",
    "a suspicious abnormality is present.",
    "a highly suggestive of malignancy is present, a biopsy is recommended.",
    "a known biopsy-proven malignant mass is present.",
), strict=True))
SIDE_TEXT = {"L": "left", "R": "right", "B": "bilateral"}
AGE_CAP = 90  # HIPAA Safe Harbor: every age over 89 is reported as one group, here "90"


@dataclass(frozen=True)
class CaptionFields:
    """Everything a caption says about one image (a shard row + one of its images)."""

    procedure: str | None
    reason: str | None  # screening / diagnostic
    age: int | None
    race: str | None
    ethnicity: str | None
    laterality: str | None  # L / R / B
    view: str | None
    density: int | None  # 1–5
    birads: str | None  # letter
    mass_shape: str | None = None
    mass_density: str | None = None
    calc_find: str | None = None
    calc_distri: str | None = None


def reason_from_procedure(procedure: str | None) -> str | None:
    """``screening`` if the procedure mentions "screen", ``diagnostic`` if "diag", else None."""
    low = (procedure or "").lower()
    if "screen" in low:
        return "screening"
    if "diag" in low:
        return "diagnostic"
    return None


def safe_harbor_age(age: int | None) -> int | None:
    """Ages over 89 become :data:`AGE_CAP` (HIPAA Safe Harbor), for shards and captions alike."""
    return None if age is None else min(int(age), AGE_CAP)


def is_complete(f: CaptionFields) -> bool:
    """The method drops an image whose procedure, reason, density or BI-RADS letter is missing."""
    return bool(f.procedure) and bool(f.reason) and f.density in DENSITY_TEXT and (
        f.birads is not None and f.birads in BIRADS_LETTERS)


def _ethnic(value: str | None) -> str:
    return "Hispanic or Latino" if value == "Hispanic or Latino" else "Non-Hispanic or Latino"


def _meta(f: CaptionFields, masked: frozenset[str]) -> dict[str, str]:
    real = {
        "age": str(safe_harbor_age(f.age)) if f.age is not None else "unknown",
        "race": f.race or "unknown",
        "ethnicity": _ethnic(f.ethnicity),
        "type": "2D",
        "side": SIDE_TEXT.get(f.laterality or "", "unknown"),
        "view": f.view or "unknown",
    }
    return {k: ("unknown" if k in masked else v) for k, v in real.items()}


def prefix_text(f: CaptionFields, masked: frozenset[str] = frozenset()) -> str:
    """Sections 1–4: procedure, reason, patient info, image info."""
    m = _meta(f, masked)
    return (
        f"Procedure reported: {f.procedure}; "
        f"Reason for procedure: {f.reason}; "
        f"Patient info: This patient is {m['race']}, {m['ethnicity']}, and {m['age']} years old.  "
        f"Image info: This is a {m['type']} full-field digital mammogram of the {m['side']} breast "
        f"with {m['view']} view.  "
    )


def density_text(density: int) -> str:
    """Section 5."""
    warn = DENSITY_WARNING if density in (3, 4) else ""
    return f"Breast composition: The breast is {DENSITY_TEXT[density]}. {warn} "


def findings_text(f: CaptionFields) -> str:
    """Section 6, with the mass and calcification sentences when both of their codes are known."""
    text = f"Findings: The mammogram shows that {MASS_TEXT[f.birads]}"
    if f.mass_shape and f.mass_density:
        text += f" The mass is {f.mass_shape} and {f.mass_density}. "
    text += " "
    if f.calc_distri and f.calc_find:
        text += f"A {f.calc_distri} {f.calc_find} calcification is present.  "
    return text


def impression_text(letter: str) -> str:
    """Sections 7 and 8."""
    n = BIRADS_LETTERS.index(letter)
    return f"Impressions: BI-RADS Category {n}: {BIRADS_DESC[letter]}. Overall Assessment: {ASSESS[letter]}. "


def caption_text(f: CaptionFields, masked: frozenset[str] = frozenset()) -> str:
    """The full structured caption (method.md §1.3) with the meta fields in ``masked`` → ``unknown``."""
    if not is_complete(f):
        raise ValueError(f"incomplete caption fields (procedure/reason/density/BI-RADS required): {f}")
    return prefix_text(f, masked) + density_text(f.density) + findings_text(f) + impression_text(f.birads)


def to_model_text(caption: str) -> str:
    """Newlines → space, ``.``/``;`` → separator token, wrapped in BOS … EOS."""
    text = caption.replace("\n", " ").replace(".", SEP).replace(";", SEP)
    return f"{BOS}{text}{EOS}"


def sample_masked(rng: np.random.Generator, p: float) -> frozenset[str]:
    """Each meta field masked independently with probability ``p`` (method.md §1.4)."""
    draws = rng.random(len(META_FIELDS))
    return frozenset(name for name, d in zip(META_FIELDS, draws, strict=True) if d < p)


def birads_prompts(f: CaptionFields) -> list[str]:
    """Seven zero-shot prompts (classes A, N, B, P, S, M, K) with the image's own unmasked prefix."""
    prefix = prefix_text(f)
    return [
        prefix + f"Findings: The mammogram shows that {MASS_TEXT[c]} " + impression_text(c)
        for c in BIRADS_LETTERS
    ]


def density_prompts(f: CaptionFields) -> list[str]:
    """Four zero-shot prompts (density 1–4) with the image's own unmasked prefix."""
    prefix = prefix_text(f)
    return [prefix + density_text(d) for d in (1, 2, 3, 4)]
