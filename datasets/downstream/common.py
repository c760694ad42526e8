"""What the downstream datasets share: reading split files, picking fraction subsets, the
dataset class that loads images (unreadable ones become None items, counted) and the collate.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.annotation import DataError
from datasets.cxr import build_transform, load_image

SPLITS = ("train", "val", "test")
FRACTIONS = (0.01, 0.1, 1.0)
log = logging.getLogger(__name__)


def check_args(split: str, fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not any(abs(fraction - f) < 1e-9 for f in FRACTIONS):
        raise ValueError(f"fraction must be one of {FRACTIONS}, got {fraction!r}")


def fraction_file(root: Path, split: str, fraction: float, names: dict) -> tuple[Path, bool]:
    """The split file of ``split`` and ``fraction`` from ``names`` ({"train": {1.0: name, 0.1:
    name, ...}, "val": name, "test": name}) and whether the fraction still has to be drawn from
    it (no official file for that fraction in ``root``: the 100% file is subset instead)."""
    if split != "train":
        return root / names[split], False
    own = names["train"].get(_key(fraction))
    if own and (root / own).is_file():
        return root / own, False
    full = root / names["train"][1.0]
    if own and own != full.name and not full.is_file():
        raise DataError(f"split file {root / own} not found (nor {full} to draw the {fraction:g} "
                        "fraction from)")
    return full, _key(fraction) != 1.0


def _key(fraction: float) -> float:
    return min(FRACTIONS, key=lambda f: abs(f - fraction))


def read_split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of every non-empty line of a split file."""
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            rows.append((n, line.split()))
    return rows


def covering_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of the N samples (labels [N, C] in {0, 1}) whose every prefix of length
    >= C holds a positive of each label that has one: first the earliest positive (in a seeded
    permutation) of each label not yet covered, the most frequent label first, then the rest of
    the permutation. Prefixes are the nested 1% / 10% / 100% subsets."""
    labels = np.asarray(labels).reshape(len(labels), -1) > 0
    perm = np.random.default_rng(seed).permutation(len(labels))
    picked: list[int] = []
    covered = np.zeros(labels.shape[1], dtype=bool)
    for c in np.argsort(-labels.sum(0), kind="stable"):
        if covered[c] or not labels[:, c].any():
            continue
        first = perm[np.flatnonzero(labels[perm, c])[0]]
        picked.append(int(first))
        covered |= labels[first]
    chosen = set(picked)
    return np.array(picked + [int(i) for i in perm if i not in chosen], dtype=np.int64)


def subset_size(n: int, fraction: float) -> int:
    return n if fraction >= 1.0 else max(1, int(round(n * fraction)))


def fraction_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the ``fraction`` subset (the prefix of :func:`covering_order`)."""
    order = covering_order(labels, seed)
    return np.sort(order[:subset_size(len(order), fraction)])


def find_image(root: Path, rel: str) -> Path | None:
    """``root/rel``, else NIH's Kaggle layout (``images_002/x.png`` stored as
    ``images_002/images/x.png``), else ``root/images/<name>``; None if none exists."""
    rel_path = Path(rel)
    candidates = [root / rel_path, root / rel_path.parent / "images" / rel_path.name,
                  root / "images" / rel_path.name]
    return next((p for p in candidates if p.is_file()), None)


class DownstreamDataset(Dataset):
    """Images (``paths``) + per-item fields (``fields(i)`` -> dict). An unreadable image makes
    its item None (``collate_downstream`` drops it), logged and counted in shared memory (so the
    counts include DataLoader workers)."""

    def __init__(self, paths: list[Path], ids: list[str], image_size: int, train: bool,
                 source: str, label_names: list[str]):
        self.paths, self.ids, self.image_size, self.train = paths, ids, image_size, train
        self.source, self.label_names = source, list(label_names)
        self.transform = build_transform(image_size, train)
        self._unreadable = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: Path) -> torch.Tensor:
        return load_image(path)

    def read(self, i: int) -> torch.Tensor | None:
        """Image i as float [1, H, W] in [0, 1]; None (counted) if unreadable."""
        try:
            return self.load(self.paths[i])
        except Exception as e:  # PIL raises many kinds
            self._unreadable[i] = True
            log.warning("%s: cannot read image %s (item %r): %s; item dropped",
                        self.source, self.paths[i], self.ids[i], e)
            return None

    def image(self, img: torch.Tensor) -> torch.Tensor:
        """[1, H, W] in [0, 1] -> normalised [1, S, S] (pretraining's transform, one channel)."""
        return self.transform(img)[:1]

    def fields(self, i: int) -> dict:
        return {}

    def __getitem__(self, i: int) -> dict | None:
        img = self.read(i)
        if img is None:
            return None
        return {"image": self.image(img), "id": self.ids[i], **self.fields(i)}

    def unreadable(self) -> torch.Tensor:
        return self._unreadable.clone()

    def mark_unreadable(self, flags: torch.Tensor) -> None:
        self._unreadable |= flags.to(torch.bool).cpu()

    def bad_counts(self) -> dict[str, int]:
        return {"unreadable_image": int(self._unreadable.sum())}

    def bad_summary(self, max_names: int = 5) -> str:
        """'skipped N unreadable_image: first paths' or '' when none."""
        bad = [str(self.paths[i]) for i in self._unreadable.nonzero().flatten().tolist()]
        if not bad:
            return ""
        more = f" (+{len(bad) - max_names} more)" if len(bad) > max_names else ""
        return f"skipped {len(bad)} unreadable_image: " + "; ".join(bad[:max_names]) + more


def collate_downstream(samples: list) -> dict | None:
    """Stack the items' tensors, make their ints (an "index") a tensor, keep their strings as
    lists; None items (unreadable images) are left out; None if none is left."""
    items = [s for s in samples if s is not None]
    if not items:
        return None
    out = {}
    for key, value in items[0].items():
        vals = [s[key] for s in items]
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.tensor(vals) if isinstance(value, int) else vals
    return out


class Indexed(Dataset):
    """A data set whose items also carry their position, "index" (per-sample de-duplication of
    the padded evaluation shards)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict | None:
        item = self.dataset[i]
        return None if item is None else {**item, "index": i}


def read_text(path: Path) -> str:
    """A text file, gzipped or not; a DataError naming it if unreadable."""
    try:
        raw = Path(path).read_bytes()
        return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8-sig")
    except (OSError, gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
