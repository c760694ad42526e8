"""SIIM-ACR run-length encoding of a mask: "start length start length ...", pixels numbered
column-major (down the first column, then the next: index = x * height + y), "-1" = empty.

Two start conventions exist: ``relative`` (the competition's ``train-rle.csv``, also what the
torchxrayvision copy ``siim-pneumothorax-train-rle.csv.gz`` holds: each start counts from the end
of the previous run, the first from pixel 0) and ``absolute`` (``stage_2_train.csv``: every start
is a pixel index; some tools number from 1, see ``one_based``). ``detect_encoding`` tells them
apart on a file's strings.
"""
from __future__ import annotations

import numpy as np

ENCODINGS = ("relative", "absolute")
EMPTY = "-1"


def _pairs(rle: str) -> np.ndarray:
    vals = np.array(rle.split(), dtype=np.int64)
    if vals.size % 2:
        raise ValueError(f"RLE has an odd number of values ({vals.size})")
    return vals.reshape(-1, 2)


def rle_decode(rle: str, height: int, width: int, encoding: str = "relative",
               one_based: bool = False) -> np.ndarray:
    """Boolean [height, width] mask of one RLE string ("-1" or "" = empty)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    flat = np.zeros(height * width, dtype=bool)
    rle = rle.strip()
    if rle in ("", EMPTY):
        return flat.reshape(width, height).T
    pairs = _pairs(rle)
    starts, lengths = pairs[:, 0], pairs[:, 1]
    if encoding == "relative":
        starts = np.cumsum(starts + np.concatenate([[0], lengths[:-1]]))
    elif one_based:
        starts = starts - 1
    if (lengths < 0).any() or (starts < 0).any() or (starts + lengths > flat.size).any():
        raise ValueError(f"RLE runs fall outside a {height}x{width} image")
    for s, n in zip(starts, lengths):
        flat[s:s + n] = True
    return flat.reshape(width, height).T


def rle_encode(mask, encoding: str = "relative") -> str:
    """RLE string of a boolean [height, width] mask ("-1" when empty)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.astype(np.int8), [0]])))
    if edges.size == 0:
        return EMPTY
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    if encoding == "relative":
        starts = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s} {n}" for s, n in zip(starts, lengths))


def detect_encoding(rles) -> str:
    """"absolute" when every string's starts increase past the previous run's end, "relative"
    as soon as one does not (relative starts are gaps, rarely increasing for long)."""
    for rle in rles:
        rle = rle.strip()
        if rle in ("", EMPTY):
            continue
        pairs = _pairs(rle)
        if len(pairs) > 1 and (pairs[1:, 0] < pairs[:-1, 0] + pairs[:-1, 1]).any():
            return "relative"
    return "absolute"
