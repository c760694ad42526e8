"""Reading the raw datasets' CSV tables (plain or gzipped) with the columns they must have."""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from datasets.annotation import DataError


def read_csv(path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    """Rows (dicts by column name) of a CSV, gzipped or not, that must have ``columns``; a
    DataError naming the file and the missing columns otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8-sig")
    except (OSError, gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read CSV: {e}") from e
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (header {reader.fieldnames})")
    return list(reader)
