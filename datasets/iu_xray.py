"""IU X-ray (OpenI, NLMCXR) raw files -> R2Gen annotation records.

Inputs, as NLM distributes them:

- the reports: ``NLMCXR_reports.tgz`` (a tar of ``ecgen-radiology/<n>.xml``) or a folder of those
  XML files. A report's id is its ``<uId id="CXR<n>">``; its sections are the
  ``<AbstractText Label="COMPARISON|INDICATION|FINDINGS|IMPRESSION">`` texts ("XXXX" is the
  collection's de-identification); its images are the ``<parentImage id="CXR<n>_...">`` ids,
  stored as ``<image id>.png`` in the NLMCXR_png release;
- optionally the view tables torchxrayvision ships: ``nlmcxr_tsne_pa.csv.gz`` (``imageid,
  tsne-view``: PA or L, derived from the images, one image of most reports) and
  ``nlmcxr_dicom_metadata.csv.gz`` (``imageid``, ``View Position``: PA, AP, LL, RL, LATERAL, ...
  or blank, noisy).

Views: an image's view is its t-SNE view when listed ("L" -> "LATERAL"; "PA" -> "AP" when the
DICOM header says AP, else "PA"), else its DICOM "View Position" (PA, AP; LL, RL, LATERAL, LARGE
LATERAL -> "LATERAL"), else "" (unknown: never taken as frontal).

Split: every IU report is one study of one patient (the DICOM "Patient ID" is the report number),
so a split by report is a patient-level split. It is deterministic and independent of the order
or number of files: the first 8 hex digits of sha256(report id) modulo 100, below 70 train, below
80 val, else test (70/10/20).
"""
from __future__ import annotations

import hashlib
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from datasets.annotation import DataError, view_rank
from datasets.csv_table import read_csv
from datasets.study_record import make_record

SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
LATERAL_CODES = {"LL", "RL", "LATERAL", "LARGE LATERAL", "L"}


@dataclass
class IUReport:
    """One IU X-ray report: id ("CXR1"), sections by label, image ids, MeSH major terms."""

    id: str
    sections: dict[str, str]
    images: list[str]
    mesh: list[str] = field(default_factory=list)
    source: str = ""


def parse_report_xml(data: bytes, source: str) -> IUReport:
    """One NLM XML report; DataError naming ``source`` and the element when it is malformed."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(f"{source}: not well-formed XML: {e}") from e
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise DataError(f"{source}: no <uId id=...> element (the report id)")
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        text = " ".join("".join(node.itertext()).split())
        if label in SECTIONS and text:
            sections[label] = text
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    mesh = [(n.text or "").strip() for n in root.iter("major") if (n.text or "").strip()]
    return IUReport(uid.get("id"), sections, images, mesh, source)


def read_reports(path: str | Path) -> list[IUReport]:
    """Every report of a ``.tgz`` of XML files or a folder of them, sorted by report number."""
    path = Path(path)
    out = []
    if path.is_dir():
        for f in sorted(path.rglob("*.xml")):
            out.append(parse_report_xml(f.read_bytes(), str(f)))
    elif path.is_file():
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.isfile() and m.name.endswith(".xml"):
                        out.append(parse_report_xml(tar.extractfile(m).read(), f"{path}:{m.name}"))
        except tarfile.TarError as e:
            raise DataError(f"{path}: cannot read the reports archive: {e}") from e
    else:
        raise DataError(f"{path}: no such reports archive or folder")
    if not out:
        raise DataError(f"{path}: no XML report found")
    return sorted(out, key=lambda r: report_number(r.id))


def report_number(rid: str) -> int:
    """"CXR123" -> 123 (ids sort by number); -1 for an id of another form."""
    digits = rid[3:] if rid.upper().startswith("CXR") else ""
    return int(digits) if digits.isdigit() else -1


def split_of(rid: str) -> str:
    """Deterministic 70/10/20 split of a report id (see the module docstring)."""
    bucket = int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 80 else "test"


def read_views(tsne_csv: str | Path | None = None, dicom_csv: str | Path | None = None) -> dict:
    """image id -> view name from the two optional tables (rule in the module docstring)."""
    dicom, tsne = {}, {}
    if dicom_csv:
        for row in read_csv(dicom_csv, ("imageid", "View Position")):
            v = row["View Position"].strip().upper()
            dicom[row["imageid"]] = "LATERAL" if v in LATERAL_CODES else v if v in ("PA", "AP") else ""
    if tsne_csv:
        for row in read_csv(tsne_csv, ("imageid", "tsne-view")):
            tsne[row["imageid"]] = row["tsne-view"].strip().upper()
    views = dict(dicom)
    for image, v in tsne.items():
        if v in LATERAL_CODES:
            views[image] = "LATERAL"
        elif v == "PA":
            views[image] = "AP" if dicom.get(image) == "AP" else "PA"
    return views


def report_text(rep: IUReport, sections: str) -> str:
    """The chosen sections' text: "findings" or "findings+impression" (what exists of the two,
    FINDINGS first); '' when the chosen sections are absent."""
    if sections == "findings":
        return rep.sections.get("FINDINGS", "")
    if sections == "findings+impression":
        return " ".join(rep.sections[s] for s in ("FINDINGS", "IMPRESSION") if s in rep.sections)
    raise ValueError(f"sections must be 'findings' or 'findings+impression', got {sections!r}")


def study_images(rep: IUReport, views: dict) -> tuple[list[str], list[str]]:
    """(image paths "<id>.png", view names), frontal first (PA, then AP, then the rest)."""
    order = sorted(range(len(rep.images)), key=lambda i: view_rank(views.get(rep.images[i], "")))
    return ([f"{rep.images[i]}.png" for i in order], [views.get(rep.images[i], "") for i in order])


def prepare(
    reports: list[IUReport],
    sections: str = "findings",
    views: dict | None = None,
    images_root: str | Path | None = None,
    graph=None,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records, [(report id, why it was dropped)]). Labels come from the project's rule labeler
    on the chosen sections (IU X-ray ships none); with ``images_root`` an image missing there is
    left out (a study left with none is dropped), without it paths are not checked."""
    views = views or {}
    records, dropped = [], []
    for rep in reports:
        text = report_text(rep, sections)
        if not text:
            dropped.append((rep.id, f"no {sections.upper().replace('+', ' or ')} section"))
            continue
        if not rep.images:
            dropped.append((rep.id, "no <parentImage> in the XML"))
            continue
        paths, vws = study_images(rep, views)
        if images_root is not None:
            keep = [i for i, p in enumerate(paths) if (Path(images_root) / p).is_file()]
            if not keep:
                dropped.append((rep.id, f"none of its {len(paths)} image(s) under {images_root}"))
                continue
            paths, vws = [paths[i] for i in keep], [vws[i] for i in keep]
        rec, reason = make_record(rep.id, text, paths, vws, split_of(rep.id), None, graph)
        if rec is None:
            dropped.append((rep.id, reason))
            continue
        records.append(rec)
    return records, dropped
