"""MIMIC-CXR raw files -> records, on a fixture tree in PhysioNet's exact layout and CSV headers."""
import gzip
import json

import pytest

from datasets.annotation import DataError
from datasets.mimic_cxr import (
    prepare,
    read_labels,
    read_split,
    report_sections,
    select_text,
    study_dir,
)
from tests.helpers import python
from vocab.observations import CHEXPERT_OBSERVATIONS

SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
CSV_OBS = (
    "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,"
    "Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
).split(",")

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 COMPARISON:  None.

 FINDINGS:

 Small right pleural effusion.  The heart is mildly
 enlarged.  No pneumothorax.

 IMPRESSION:

 Small right effusion and mild cardiomegaly.
"""
ONLY_IMPRESSION = "FINAL REPORT\n INDICATION: ___ with fever.\n\n IMPRESSION: No acute process.\n"

# (subject, study, split, [(dicom, view, jpg exists)], report text or None)
STUDIES = [
    ("10000032", "50414267", "train", [("d2", "LATERAL", True), ("d1", "PA", True)], REPORT),
    ("10000032", "53189527", "train", [("d3", "LL", True), ("d4", "AP", True)], ONLY_IMPRESSION),
    ("10000032", "56699142", "train", [("d5", "PA", True)], None),
    ("11000011", "51111111", "validate", [("d6", "PA", False)], REPORT),
    ("12000022", "52222222", "test", [("d7", "LATERAL", True), ("d8", "", True)], REPORT),
]


def gz(path, lines):
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def make_tree(root):
    split, meta = [SPLIT_HEADER], [META_HEADER]
    for subject, study, sp, images, report in STUDIES:
        d = root / study_dir(subject, study)
        d.mkdir(parents=True)
        for dicom, view, exists in images:
            split.append(f"{dicom},{study},{subject},{sp}")
            meta.append(f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,"
                        "21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect")
            if exists:
                (d / f"{dicom}.jpg").write_bytes(b"\xff\xd8jpg")
        if report is not None:
            (root / f"{study_dir(subject, study)}.txt").write_text(report)
    gz(root / "mimic-cxr-2.0.0-split.csv.gz", split)
    gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    row = {o: "" for o in CSV_OBS} | {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0",
                                      "Pneumothorax": "0.0"}
    gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", [
        "subject_id,study_id," + ",".join(CSV_OBS),
        "10000032,50414267," + ",".join(row[o] for o in CSV_OBS),
        "10000032,53189527," + ",".join("1.0" if o == "No Finding" else "" for o in CSV_OBS),
    ])
    return root


def test_sections_of_a_report():
    s = report_sections(REPORT)
    assert s["FINDINGS"] == "Small right pleural effusion. The heart is mildly enlarged. No pneumothorax."
    assert s["IMPRESSION"] == "Small right effusion and mild cardiomegaly."
    assert s["INDICATION"].startswith("___F with cough")
    assert select_text(s, "findings") == (s["FINDINGS"], "")
    assert select_text(s, "findings+impression")[0] == s["FINDINGS"] + " " + s["IMPRESSION"]
    only = report_sections(ONLY_IMPRESSION)
    assert select_text(only, "findings") == ("", "no FINDINGS section")
    assert select_text(only, "findings+impression") == ("No acute process.", "")
    both = report_sections("FINDINGS AND IMPRESSION: Clear lungs.")
    assert select_text(both, "findings+impression") == ("Clear lungs.", "")


def test_prepare_views_labels_anatomies_and_drops(tmp_path):
    root = make_tree(tmp_path)
    records, dropped, rule_labelled = prepare(
        root, root / "mimic-cxr-2.0.0-split.csv.gz", root / "mimic-cxr-2.0.0-metadata.csv.gz",
        root / "mimic-cxr-2.0.0-chexpert.csv.gz", "findings",
    )
    assert [r["id"] for r in records] == ["50414267", "52222222"]
    first = records[0]
    base = "files/p10/p10000032/s50414267"
    assert first["image_path"] == [f"{base}/d1.jpg", f"{base}/d2.jpg"]      # frontal first
    assert first["views"] == ["PA", "LATERAL"] and first["split"] == "train"
    assert first["report"].startswith("Small right pleural effusion.")
    want = [None] * 14
    want[CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = 1.0
    want[CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = -1.0
    want[CHEXPERT_OBSERVATIONS.index("Pneumothorax")] = 0.0
    assert first["labels"] == want                            # the project's order, not the CSV's
    assert first["anatomies"] == ["right costophrenic angle", "right atrium", "cavoatrial junction"]
    assert records[1]["views"] == ["LATERAL", ""] and records[1]["split"] == "test"
    assert rule_labelled == 1                                 # 52222222 has no row in the CSV
    reasons = dict(dropped)
    assert reasons["53189527"].startswith("no FINDINGS section")
    assert reasons["56699142"].startswith("no report file")
    assert reasons["51111111"].startswith("none of its 1 image(s) found")
    records, dropped, _ = prepare(
        root, root / "mimic-cxr-2.0.0-split.csv.gz", root / "mimic-cxr-2.0.0-metadata.csv.gz",
        None, "findings+impression",
    )
    imp = next(r for r in records if r["id"] == "53189527")
    assert imp["views"] == ["AP", "LL"] and imp["report"] == "No acute process."
    assert imp["labels"][CHEXPERT_OBSERVATIONS.index("No Finding")] == 1.0   # rule labeler


def test_bad_csvs_name_file_row_and_column(tmp_path):
    bad = tmp_path / "split.csv.gz"
    gz(bad, ["dicom_id,study_id,split", "d1,5,train"])
    with pytest.raises(DataError, match=r"split.csv.gz: missing column\(s\) \['subject_id'\]"):
        read_split(bad)
    gz(bad, [SPLIT_HEADER, "d1,5,10,training"])
    with pytest.raises(DataError, match="split.csv.gz: row 2: column 'split' is 'training'"):
        read_split(bad)
    labels = tmp_path / "chexpert.csv.gz"
    gz(labels, ["subject_id,study_id," + ",".join(CSV_OBS), "1,2," + ",".join(["yes"] * 14)])
    with pytest.raises(DataError, match="chexpert.csv.gz: row 2: column 'Enlarged Cardiomediastinum'"):
        read_labels(labels)


def test_script_prints_drops_and_counts(tmp_path):
    root = make_tree(tmp_path / "mimic")
    out = tmp_path / "annotation.json"
    proc = python("scripts/prepare_mimic.py", "--root", root, "--out", out)
    assert "dropped study 56699142: no report file" in proc.stdout
    assert "dropped study 53189527: no FINDINGS section" in proc.stdout
    assert f"wrote {out}: train 1, val 0, test 1 studies" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["id"] for r in data["train"]] == ["50414267"] and data["val"] == []
    proc = python("scripts/prepare_mimic.py", "--root", root, "--out", out,
                  "--sections", "findings+impression", "--labels", "negbio", check=False)
    assert proc.returncode == 1 and "mimic-cxr-2.0.0-negbio.csv.gz: cannot read CSV" in proc.stderr
