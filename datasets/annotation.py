"""R2Gen ``annotation.json``: ``{"train"|"val"|"test": [{"id", "report", "image_path": [...],
...}]}``, read, validated and written; a problem is a DataError naming the file, the record and
the field.

Optional fields: ``labels`` (14 values in ``CHEXPERT_OBSERVATIONS`` order: 1, 0, -1, null),
``anatomies`` (anatomy-graph names) and ``views`` (one view name per ``image_path`` entry: "PA",
"AP", "LATERAL", ... or "" when unknown; "PA" and "AP" are the frontal views).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SPLITS = ("train", "val", "test")
FRONTAL_VIEWS = ("PA", "AP")      # in order of preference


class DataError(ValueError):
    """A bad annotation file, record or image; the message names the file and the record."""


def load_annotation(path: str | Path, split: str) -> list[dict]:
    """Records of one split of an R2Gen annotation file, validated.

    Each record is checked for a string "id", a string "report" and a non-empty list of
    string "image_path"; a problem raises DataError naming the file, the record and the
    field. ``validate_record`` is the per-record check (used by the dataset to skip).
    """
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read annotation file: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a mapping of splits")
    if split not in data:
        raise DataError(f"{path}: no split {split!r} (has {sorted(data)})")
    records = data[split]
    if not isinstance(records, list):
        raise DataError(f"{path}: split {split!r} must be a list of records")
    return records


def validate_record(rec, path: str | Path, pos: int) -> str | None:
    """None if ``rec`` is a well-formed record, else the reason (names file, record, field)."""
    if not isinstance(rec, dict):
        return f"{path}: record #{pos} is not a mapping"
    rid = rec.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        return f"{path}: record #{pos}: field 'id' missing or not a string"
    where = f"{path}: record {rid!r} (#{pos})"
    if not isinstance(rec.get("report"), str):
        return f"{where}: field 'report' missing or not a string"
    paths = rec.get("image_path")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        return f"{where}: field 'image_path' must be a non-empty list of paths"
    labels = rec.get("labels")
    if labels is not None and (
        not isinstance(labels, list)
        or len(labels) != 14
        or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in labels
        )
    ):
        return f"{where}: field 'labels' must be a list of 14 numbers or nulls"
    anat = rec.get("anatomies")
    if anat is not None and (
        not isinstance(anat, list) or not all(isinstance(a, str) for a in anat)
    ):
        return f"{where}: field 'anatomies' must be a list of anatomy names"
    views = rec.get("views")
    n_paths = len(paths)
    if views is not None and (
        not isinstance(views, list)
        or len(views) != n_paths
        or not all(isinstance(v, str) for v in views)
    ):
        return f"{where}: field 'views' must be a list of {n_paths} view names (one per image_path)"
    return None


def frontal_index(views: list[str]) -> int | None:
    """Index of the study's frontal image: the first "PA", else the first "AP"; None when the
    study has no frontal view (a lateral is never returned)."""
    for want in FRONTAL_VIEWS:
        for i, v in enumerate(views):
            if v.upper() == want:
                return i
    return None


def view_rank(view: str) -> int:
    """Sort key that puts PA first, then AP, then every other view (unknown "" last)."""
    v = view.upper()
    if v in FRONTAL_VIEWS:
        return FRONTAL_VIEWS.index(v)
    return len(FRONTAL_VIEWS) + (v == "")


def write_annotation(path: str | Path, records: list[dict]) -> dict[str, int]:
    """Write records (each with a "split" in SPLITS) as an R2Gen annotation file, atomically;
    returns the number of records per split."""
    path = Path(path)
    bad = [r.get("id") for r in records if r.get("split") not in SPLITS]
    if bad:
        raise DataError(f"{path}: records with a split outside {SPLITS}: {bad[:5]}")
    data = {sp: [r for r in records if r["split"] == sp] for sp in SPLITS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return {sp: len(v) for sp, v in data.items()}
