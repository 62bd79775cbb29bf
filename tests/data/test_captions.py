"""Captions against the method's own illustrative example (method.md §1.3) and its rules."""

import numpy as np
import pytest

from mama_ray.data import captions as cap
from mama_ray.data.captions import SEP as S

EXAMPLE = cap.CaptionFields(
    procedure="MG Diagnostic Left", reason="diagnostic", age=61, race="White", ethnicity=None,
    laterality="L", view="MLO", density=4, birads="S", mass_shape="irregular", mass_density="high density",
)


def test_method_example_verbatim():
    text = cap.to_model_text(cap.caption_text(EXAMPLE, masked=frozenset({"race", "side"})))
    expected = (
        f"{cap.BOS}Procedure reported: MG Diagnostic Left{S} Reason for procedure: diagnostic{S} "
        f"Patient info: This patient is unknown, Non-Hispanic or Latino, and 61 years old{S}  "
        f"Image info: This is a 2D full-field digital mammogram of the unknown breast with MLO view{S}  "
        f"Breast composition: The breast is extremely dense{S} This may lower the sensitivity of mammography{S}  "
        f"Findings: The mammogram shows that a suspicious abnormality is present{S} The mass is irregular and high density{S}  "
        f"Impressions: BI-RADS Category 4: suspicious abnormality{S} Overall Assessment: Suspicious abnormality{S} {cap.EOS}"
    )
    assert text == expected


def test_unmasked_fields_and_calcification_sentence():
    f = cap.CaptionFields("MG Screening Bilateral", "screening", None, "Asian", "Hispanic or Latino",
                          "R", "CC", 1, "N", calc_find="punctate", calc_distri="grouped")
    text = cap.caption_text(f)
    assert "This patient is Asian, Hispanic or Latino, and unknown years old." in text
    assert "of the right breast with CC view." in text
    assert "The breast is almost entirely fat.  Findings" in text  # no sensitivity sentence for 1
    assert "A grouped punctate calcification is present." in text
    assert "BI-RADS Category 1: negative. Overall Assessment: Negative. " in text


@pytest.mark.parametrize("missing", ["procedure", "reason", "density", "birads"])
def test_incomplete_captions_are_rejected(missing):
    f = cap.CaptionFields(**{**EXAMPLE.__dict__, missing: None})
    assert not cap.is_complete(f)
    with pytest.raises(ValueError, match="incomplete"):
        cap.caption_text(f)
    assert not cap.is_complete(cap.CaptionFields(**{**EXAMPLE.__dict__, "birads": "X"}))


def test_reason_rule():
    assert cap.reason_from_procedure("MG SCREENING BILAT") == "screening"
    assert cap.reason_from_procedure("MG Diag Left") == "diagnostic"
    assert cap.reason_from_procedure("US Breast") is None


def test_mask_rate_is_p_per_field():
    rng = np.random.default_rng(0)
    draws = [cap.sample_masked(rng, 0.8) for _ in range(4000)]
    for name in cap.META_FIELDS:
        rate = sum(name in d for d in draws) / len(draws)
        assert abs(rate - 0.8) < 0.03
    assert cap.sample_masked(rng, 0.0) == frozenset()


def test_zero_shot_prompts():
    b = cap.birads_prompts(EXAMPLE)
    assert len(b) == 7 and all(p.startswith(cap.prefix_text(EXAMPLE)) for p in b)
    assert "unknown" not in b[0]  # the image's own, unmasked metadata
    assert b[4].endswith("Findings: The mammogram shows that a suspicious abnormality is present. "
                         "Impressions: BI-RADS Category 4: suspicious abnormality. Overall Assessment: Suspicious abnormality. ")
    d = cap.density_prompts(EXAMPLE)
    assert len(d) == 4 and "Breast composition" in d[0] and "Findings" not in d[0]
    assert cap.DENSITY_WARNING in d[2] and cap.DENSITY_WARNING not in d[1]
