"""IU X-ray NLM XML reports -> records: fixture XMLs, and the real reports and view tables that the
torchxrayvision wheel ships (read at test time)."""
import collections
import gzip
import hashlib
import json

import pytest

from datasets.annotation import DataError, frontal_index
from datasets.iu_xray import (
    parse_report_xml,
    prepare,
    read_reports,
    read_views,
    report_number,
    report_text,
    split_of,
)
from tests.helpers import python, xrv_file

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH><major>normal</major></MeSH>
{images}
</eCitation>"""


def xml(n, findings, impression, images):
    tags = "".join(f'<parentImage id="{i}"><caption>Xray Chest PA and Lateral</caption>'
                   "</parentImage>" for i in images)
    return XML.format(n=n, findings=findings, impression=impression, images=tags).encode()


def make_folder(root):
    root.mkdir()
    (root / "2.xml").write_bytes(xml(2, "Small left pleural effusion.", "Effusion.",
                                     ["CXR2_IM-0652-2001", "CXR2_IM-0652-1001"]))
    (root / "10.xml").write_bytes(xml(10, "", "No acute disease.", ["CXR10_IM-0002-1001"]))
    (root / "11.xml").write_bytes(xml(11, "The lungs are clear.", "", []))
    return root


def test_parse_read_and_sections(tmp_path):
    reports = read_reports(make_folder(tmp_path / "xml"))
    assert [r.id for r in reports] == ["CXR2", "CXR10", "CXR11"]        # by report number
    two = reports[0]
    assert two.sections["INDICATION"] == "XXXX-year-old with cough"
    assert two.images == ["CXR2_IM-0652-2001", "CXR2_IM-0652-1001"] and two.mesh == ["normal"]
    assert report_text(two, "findings+impression") == "Small left pleural effusion. Effusion."
    assert report_text(reports[1], "findings") == ""
    assert report_number("CXR123") == 123 and report_number("other") == -1
    with pytest.raises(DataError, match=r"bad.xml: not well-formed XML"):
        parse_report_xml(b"<eCitation>", "bad.xml")
    with pytest.raises(DataError, match=r"x.xml: no <uId id=...> element"):
        parse_report_xml(b"<eCitation/>", "x.xml")


def test_views_split_and_records(tmp_path):
    tsne = tmp_path / "tsne.csv"
    tsne.write_text("imageid,tsne-view\nCXR2_IM-0652-1001,L\n")
    dicom = tmp_path / "dicom.csv.gz"
    dicom.write_bytes(gzip.compress(
        b"imageid,View Position,Patient ID\nCXR2_IM-0652-1001,PA,2\nCXR2_IM-0652-2001,AP,2\n"
    ))
    views = read_views(tsne, dicom)
    # the t-SNE view overrides a DICOM header that calls a lateral film PA
    assert views == {"CXR2_IM-0652-1001": "LATERAL", "CXR2_IM-0652-2001": "AP"}
    reports = read_reports(make_folder(tmp_path / "xml"))
    records, dropped = prepare(reports, "findings", views)
    assert dropped == [("CXR10", "no FINDINGS section"), ("CXR11", "no <parentImage> in the XML")]
    (rec,) = records
    assert rec["image_path"] == ["CXR2_IM-0652-2001.png", "CXR2_IM-0652-1001.png"]
    assert rec["views"] == ["AP", "LATERAL"] and rec["split"] == split_of("CXR2")
    assert rec["anatomies"] == ["left costophrenic angle"]
    assert rec["labels"][9] == 1.0                       # Pleural Effusion, by the rule labeler
    images = tmp_path / "png"
    images.mkdir()
    (images / "CXR2_IM-0652-1001.png").write_bytes(b"png")
    (rec,), _ = prepare(reports, "findings", views, images)
    assert rec["image_path"] == ["CXR2_IM-0652-1001.png"] and rec["views"] == ["LATERAL"]
    with pytest.raises(DataError, match=r"tsne.csv: missing column\(s\) \['tsne-view'\]"):
        tsne.write_text("imageid,view\n")
        read_views(tsne)


def test_split_is_a_stable_hash_of_the_report_id():
    ids = [f"CXR{n}" for n in range(1, 4001)]
    counts = collections.Counter(split_of(i) for i in ids)
    assert abs(counts["train"] / 4000 - 0.7) < 0.03 and abs(counts["test"] / 4000 - 0.2) < 0.03
    for rid in ids[:50]:           # the stated rule: sha256(id)[:8] as a number, modulo 100
        bucket = int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16) % 100
        assert split_of(rid) == ("train" if bucket < 70 else "val" if bucket < 80 else "test")
    assert split_of("CXR1") == "val" and split_of("CXR2") == "train"


def test_real_iu_xray_reports_from_the_wheel(tmp_path):
    for name in ("NLMCXR_reports.tgz", "nlmcxr_tsne_pa.csv.gz", "nlmcxr_dicom_metadata.csv.gz"):
        (tmp_path / name).write_bytes(xrv_file(name))
    reports = read_reports(tmp_path / "NLMCXR_reports.tgz")
    assert len(reports) == 3955 and reports[0].id == "CXR1"
    assert reports[0].images == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert "no pulmonary edema" in reports[0].sections["FINDINGS"]
    views = read_views(tmp_path / "nlmcxr_tsne_pa.csv.gz", tmp_path / "nlmcxr_dicom_metadata.csv.gz")
    assert views["CXR1_1_IM-0001-3001"] == "LATERAL" and views["CXR100_IM-0002-1001"] == "PA"
    out = tmp_path / "annotation.json"
    proc = python("scripts/prepare_iu_xray.py", "--reports", tmp_path / "NLMCXR_reports.tgz",
                  "--tsne-views", tmp_path / "nlmcxr_tsne_pa.csv.gz",
                  "--dicom-views", tmp_path / "nlmcxr_dicom_metadata.csv.gz", "--out", out)
    assert "dropped report CXR3992: no FINDINGS section" in proc.stdout
    assert "studies from 3955 reports (sections: findings)" in proc.stdout
    data = json.loads(out.read_text())
    records = [r for sp in ("train", "val", "test") for r in data[sp]]
    assert len(records) + proc.stdout.count("dropped report ") == 3955
    assert {sp: len(data[sp]) for sp in data} == {"train": 2341, "val": 339, "test": 657}
    for r in records:
        assert len(r["views"]) == len(r["image_path"]) and len(r["labels"]) == 14
        k = frontal_index(r["views"])
        assert k is None or (k == 0 and r["views"][0] in ("PA", "AP"))    # frontal first
    with_frontal = sum(frontal_index(r["views"]) is not None for r in records)
    assert with_frontal / len(records) > 0.9
