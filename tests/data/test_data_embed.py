"""EMBED tables → records: clinical-row choice (method.md §1.2), caption fields, drop rules, patient split."""

from __future__ import annotations

import pandas as pd
import pytest

from mama_ray.data.embed import (
    EmbedTables,
    choose_clinical_row,
    image_records,
    load_tables,
    patient_splits,
)


def _rows(*pairs):
    return [dict(acc_anon="1", side=s, asses=a) for s, a in pairs]


@pytest.mark.parametrize("pairs, side, expected", [
    ([("L", "S"), ("R", "N")], "R", 1),  # same side wins
    ([("L", "S"), ("R", "N")], "L", 0),
    ([("B", "B"), ("L", "M")], "R", 0),  # no R row → the B row
    ([("L", "N"), ("L", "K")], "R", 1),  # no R, no B → all rows; highest letter K
    ([("L", "N"), ("L", "A"), ("L", "B")], "L", 1),  # A/N/B mix with an A → the A row
    ([("L", "N"), ("L", "B")], "L", 1),  # no A: highest (B=2)
    ([("L", "S"), ("L", "S")], "L", 0),  # ties → first
    ([("L", None), ("L", "X")], "L", 0),  # no valid letter → first
])
def test_clinical_row_choice_follows_method_1_2(pairs, side, expected):
    assert choose_clinical_row(_rows(*pairs), side) == expected


def test_no_clinical_rows_gives_none():
    assert choose_clinical_row(_rows(), "L") is None


def _tables():
    meta = pd.DataFrame([
        dict(anon_dicom_path="p1/a1/img1.dcm", empi_anon="p1", acc_anon="a1", FinalImageType="2D",
             ImageLateralityFinal="L", ViewPosition="CC", StudyDescription="MG Screening Bilateral"),
        dict(anon_dicom_path="p1/a1/img2.dcm", empi_anon="p1", acc_anon="a1", FinalImageType="2D",
             ImageLateralityFinal="R", ViewPosition="MLO", StudyDescription="MG Screening Bilateral"),
        dict(anon_dicom_path="p1/a1/img3.dcm", empi_anon="p1", acc_anon="a1", FinalImageType="cview",
             ImageLateralityFinal="R", ViewPosition="CC", StudyDescription="MG Screening Bilateral"),
        dict(anon_dicom_path="p2/a2/img4.dcm", empi_anon="p2", acc_anon="a2", FinalImageType="2D",
             ImageLateralityFinal="L", ViewPosition="CC", StudyDescription="MG Other"),
        dict(anon_dicom_path="/abs/img5.dcm", empi_anon="p3", acc_anon="a3", FinalImageType="2D",
             ImageLateralityFinal="L", ViewPosition="CC", StudyDescription="MG Diagnostic Left"),
    ])
    clin = pd.DataFrame([
        dict(acc_anon="a1", side="L", asses="S", tissueden=3.0, age_at_study=61.0, RACE_DESC="Asian",
             ETHNIC_GROUP_DESC="Hispanic or Latino", massshape="X", massdens="+", calcfind=None, calcdistri=None),
        dict(acc_anon="a1", side="R", asses="N", tissueden=3.0, age_at_study=61.0, RACE_DESC="Asian",
             ETHNIC_GROUP_DESC="Hispanic or Latino", massshape=None, massdens=None, calcfind=None, calcdistri=None),
        dict(acc_anon="a2", side="L", asses="N", tissueden=2.0, age_at_study=50.0, RACE_DESC=None,
             ETHNIC_GROUP_DESC=None, massshape=None, massdens=None, calcfind=None, calcdistri=None),
    ])
    legend = pd.DataFrame({"Header in export": ["massshape", "massdens"], "Code": ["X", "+"],
                           "Meaning": ["irregular", "high density"]})
    return EmbedTables(meta, clin, legend)


def test_records_carry_fields_and_drops_are_quarantined_with_reasons():
    records, quarantine = image_records(_tables(), "s3://b/dicoms")
    assert [r.image_id for r in records] == ["img1", "img2"]
    left, right = records[0].fields, records[1].fields
    assert records[0].source == "s3://b/dicoms/p1/a1/img1.dcm"
    assert (left.birads, left.density, left.mass_shape, left.mass_density) == ("S", 3, "irregular", "high density")
    assert (right.birads, right.mass_shape, right.reason, right.age) == ("N", None, "screening", 61)
    reasons = {q["image_id"]: q["reason"] for q in quarantine}
    assert reasons["img3"] == "FinalImageType 'cview' is not 2D"
    assert reasons["img4"] == "caption incomplete: missing reason"  # "MG Other": neither screen nor diag
    assert reasons["img5"] == "no clinical row for the study"
    assert next(q for q in quarantine if q["image_id"] == "img5")["source"] == "/abs/img5.dcm"
    assert len(records) + len(quarantine) == 5


def test_patient_split_is_70_10_20_by_patient_and_seeded():
    patients = [f"p{i:03d}" for i in range(100)] * 3  # each patient three times
    a = patient_splits(patients, [0.7, 0.1, 0.2], seed=1)
    assert len(a) == 100
    assert [sum(v == s for v in a.values()) for s in ("train", "val", "test")] == [70, 10, 20]
    assert a == patient_splits(list(reversed(patients)), [0.7, 0.1, 0.2], seed=1)  # order-free
    assert a != patient_splits(patients, [0.7, 0.1, 0.2], seed=2)


def test_load_tables_reads_embed_files_and_names_missing_columns(tmp_path):
    t = _tables()
    t.metadata.to_csv(tmp_path / "EMBED_OpenData_metadata_reduced_train.csv", index=False)
    t.clinical.to_csv(tmp_path / "EMBED_OpenData_clinical.csv", index=False)
    t.clinical.drop(columns=["massshape"]).to_csv(tmp_path / "EMBED_OpenData_clinical_reduced.csv", index=False)
    t.legend.to_csv(tmp_path / "AWS_Open_Data_Clinical_Legend.csv", index=False)
    loaded = load_tables(str(tmp_path))
    assert "massshape" in loaded.clinical.columns and len(loaded.metadata) == 5  # full table preferred
    assert loaded.metadata["empi_anon"].tolist()[0] == "p1"
    t.metadata.drop(columns=["ViewPosition"]).to_csv(tmp_path / "EMBED_OpenData_metadata_reduced_train.csv", index=False)
    with pytest.raises(ValueError, match="ViewPosition"):
        load_tables(str(tmp_path))


def test_caption_fields_from_tables_and_from_a_study_row_agree():
    """Two builders, each named by what it reads: EMBED table rows (ingest) and a shard's study row."""
    from mama_ray.data import embed, samples

    assert not hasattr(embed, "caption_fields") and not hasattr(samples, "caption_fields")  # no shared name
    t = _tables()
    meta, clin = t.metadata.iloc[0].to_dict(), t.clinical.iloc[0].to_dict()
    f = embed.caption_fields_from_tables(meta, clin, {("massshape", "X"): "irregular"})
    assert (f.procedure, f.reason, f.age, f.laterality, f.view, f.birads, f.density, f.mass_shape) == (
        "MG Screening Bilateral", "screening", 61, "L", "CC", "S", 3, "irregular")
    study = {k: getattr(f, k) for k in samples.STUDY_CAPTION_FIELDS}  # the shard keeps these per study
    image = {k: getattr(f, k) for k in samples.CAPTION_FIELDS if k not in samples.STUDY_CAPTION_FIELDS}
    assert samples.caption_fields_from_study(study, image) == f
