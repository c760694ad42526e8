"""MIMIC-CXR raw files -> R2Gen annotation records.

Inputs, in PhysioNet's layouts (MIMIC-CXR-JPG 2.0.0 and the MIMIC-CXR 2.0.0 reports):

- images ``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``;
- reports ``files/p<first 2 digits>/p<subject_id>/s<study_id>.txt`` (the JPG tree or a separate
  reports root);
- ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id,study_id,subject_id,split`` (train, validate,
  test; validate becomes "val");
- ``mimic-cxr-2.0.0-metadata.csv.gz``: ``dicom_id, ..., ViewPosition, ...`` (PA, AP, LATERAL, LL,
  ... or blank);
- ``mimic-cxr-2.0.0-chexpert.csv.gz`` or ``-negbio.csv.gz``: ``subject_id,study_id`` and the 14
  observation columns (1.0, 0.0, -1.0 or blank), reordered here to ``CHEXPERT_OBSERVATIONS``.

A report's sections are headed by an upper-case name and a colon at the start of a line
("FINDINGS:", "IMPRESSION:", "INDICATION:", ...); text before the first heading ("FINAL REPORT",
"WET READ") is no section. FINDINGS also answers to "FINDING" and "FINDINGS AND IMPRESSION",
IMPRESSION to "IMPRESSIONS", "CONCLUSION" and "FINDINGS AND IMPRESSION". Bad CSVs raise
DataError naming the file, the row and the column.
"""
from __future__ import annotations

import re
from pathlib import Path

from datasets.annotation import DataError, view_rank
from datasets.csv_table import read_csv
from datasets.study_record import make_record
from vocab.observations import CHEXPERT_OBSERVATIONS

SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:", re.MULTILINE)
_ALIASES = {
    "FINDINGS": ("FINDINGS", "FINDING", "FINDINGS AND IMPRESSION"),
    "IMPRESSION": ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "FINDINGS AND IMPRESSION"),
}


def report_sections(text: str) -> dict[str, str]:
    """Heading -> its text (whitespace collapsed; a repeated heading's texts joined)."""
    out: dict[str, str] = {}
    heads = list(_HEADING.finditer(text))
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        name = " ".join(m.group(1).split())
        if body:
            out[name] = f"{out[name]} {body}" if name in out else body
    return out


def section(sections: dict[str, str], name: str) -> str:
    """FINDINGS or IMPRESSION text under any of its headings ('' when absent)."""
    return " ".join(sections[h] for h in _ALIASES[name] if h in sections)


def select_text(sections: dict[str, str], which: str) -> tuple[str, str]:
    """(text, "") or ("", reason) for ``which`` = "findings" | "findings+impression"."""
    findings, impression = section(sections, "FINDINGS"), section(sections, "IMPRESSION")
    if which == "findings":
        return (findings, "") if findings else ("", "no FINDINGS section")
    if which == "findings+impression":
        parts = [findings] + ([impression] if impression and impression != findings else [])
        text = " ".join(p for p in parts if p)
        return (text, "") if text else ("", "no FINDINGS or IMPRESSION section")
    raise ValueError(f"sections must be 'findings' or 'findings+impression', got {which!r}")


def study_dir(subject_id: str, study_id: str) -> str:
    """"files/p10/p10000032/s50414267" (relative to the JPG or reports root)."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


def read_split(path) -> dict[str, dict]:
    """study_id -> {"subject_id", "split", "dicoms": [dicom_id, ...]} (split already renamed)."""
    studies: dict[str, dict] = {}
    for row_no, row in enumerate(read_csv(path, ("dicom_id", "study_id", "subject_id", "split")), 2):
        split = SPLIT_NAMES.get(row["split"].strip())
        if split is None:
            raise DataError(
                f"{path}: row {row_no}: column 'split' is {row['split']!r} "
                f"(expected one of {sorted(SPLIT_NAMES)})"
            )
        for col in ("dicom_id", "study_id", "subject_id"):
            if not row[col].strip():
                raise DataError(f"{path}: row {row_no}: column {col!r} is empty")
        st = studies.setdefault(
            row["study_id"].strip(),
            {"subject_id": row["subject_id"].strip(), "split": split, "dicoms": [], "splits": set()},
        )
        st["dicoms"].append(row["dicom_id"].strip())
        st["splits"].add(split)
    return studies


def read_views(path) -> dict[str, str]:
    """dicom_id -> ViewPosition (upper case; '' when blank)."""
    rows = read_csv(path, ("dicom_id", "ViewPosition"))
    return {r["dicom_id"].strip(): r["ViewPosition"].strip().upper() for r in rows}


def read_labels(path) -> dict[str, list]:
    """study_id -> 14 labels in ``CHEXPERT_OBSERVATIONS`` order (1.0, 0.0, -1.0 or None)."""
    out = {}
    for row_no, row in enumerate(read_csv(path, ("study_id",) + CHEXPERT_OBSERVATIONS), 2):
        values = []
        for obs in CHEXPERT_OBSERVATIONS:
            v = row[obs].strip()
            try:
                value = None if v == "" else float(v)
            except ValueError:
                value = -2.0
            if value not in (None, 1.0, 0.0, -1.0):
                raise DataError(
                    f"{path}: row {row_no}: column {obs!r} is {v!r} (expected 1.0, 0.0, -1.0 or "
                    "blank)"
                )
            values.append(value)
        out[row["study_id"].strip()] = values
    return out


def study_images(
    images_root: Path, subject_id: str, study_id: str, dicoms: list[str], views: dict
) -> tuple[list[str], list[str], int]:
    """(existing JPG paths relative to ``images_root``, their views, number missing): frontal
    first (PA, then AP), then the other views, each group by dicom_id."""
    base = study_dir(subject_id, study_id)
    found = [d for d in sorted(dicoms) if (images_root / base / f"{d}.jpg").is_file()]
    found.sort(key=lambda d: view_rank(views.get(d, "")))
    return (
        [f"{base}/{d}.jpg" for d in found],
        [views.get(d, "") for d in found],
        len(dicoms) - len(found),
    )


def prepare(
    images_root: str | Path,
    split_csv: str | Path,
    metadata_csv: str | Path,
    labels_csv: str | Path | None,
    sections: str = "findings",
    reports_root: str | Path | None = None,
    graph=None,
) -> tuple[list[dict], list[tuple[str, str]], int]:
    """(records, [(study_id, why it was dropped)], studies labelled by the rule labeler because
    the labels CSV has no row for them). Records are sorted by study_id; ``image_path`` is
    relative to ``images_root``; ``views`` holds each image's ViewPosition."""
    images_root = Path(images_root)
    reports_root = Path(reports_root) if reports_root else images_root
    studies = read_split(split_csv)
    views = read_views(metadata_csv)
    labels = read_labels(labels_csv) if labels_csv else {}
    records, dropped, rule_labelled = [], [], 0
    for study_id in sorted(studies):
        st = studies[study_id]
        subject = st["subject_id"]
        if len(st["splits"]) > 1:
            dropped.append((study_id, f"its images are in several splits {sorted(st['splits'])}"))
            continue
        report_file = reports_root / f"{study_dir(subject, study_id)}.txt"
        try:
            raw = report_file.read_text(errors="replace")
        except OSError:
            dropped.append((study_id, f"no report file {report_file}"))
            continue
        text, reason = select_text(report_sections(raw), sections)
        if reason:
            dropped.append((study_id, f"{reason} in {report_file}"))
            continue
        paths, vws, missing = study_images(images_root, subject, study_id, st["dicoms"], views)
        if not paths:
            where = images_root / study_dir(subject, study_id)
            dropped.append((study_id, f"none of its {missing} image(s) found under {where}"))
            continue
        study_labels = labels.get(study_id)
        rule_labelled += study_labels is None and labels_csv is not None
        rec, reason = make_record(
            study_id, text, paths, vws, st["split"], study_labels, graph,
            subject_id=subject, study_id=study_id,
        )
        if rec is None:
            dropped.append((study_id, f"{reason} ({report_file})"))
            continue
        records.append(rec)
    return records, dropped, rule_labelled
