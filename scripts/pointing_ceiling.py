"""The best strict pointing game a patch-grid heatmap can reach on the generator's region masks.

A leaf's heatmap is its attention over the g x g patch grid, rendered by models/heatmaps.py
(bilinear upsampling, a blur of half a patch): attention on one patch peaks at that patch's centre
(at the image border for a border patch). Per mask this takes the best single patch; averaged per
leaf, then over leaves, it bounds what one-patch maps can score. (Attention split evenly between
neighbours can peak between centres, so a model can beat it on thin regions, rarely.) The "fixed"
figure takes, per leaf, the one patch that is best over all studies together: what a map that
ignores the image (a location prior alone) scores. It tells what an image and patch size allow
before any training:
    python scripts/pointing_ceiling.py --masks data/synthetic/masks --size 64 --patch 8 --size 96 --patch 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.heatmaps import leaf_heatmaps  # noqa: E402


def patch_peaks(size: int, patch: int) -> np.ndarray:
    """Bool ``[g*g, size, size]``: the maximal pixels of the rendered heatmap of each one-patch
    attention."""
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
    g = size // patch
    maps = leaf_heatmaps(torch.eye(g * g)[None], (g, g), size)[0].numpy()
    return maps == maps.max(axis=(1, 2), keepdims=True)


def patch_scores(mask: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """``[g*g]``: each one-patch map's pointing-game score (share of its peak pixels inside
    ``mask``)."""
    return (peaks & mask).sum(axis=(1, 2)) / peaks.sum(axis=(1, 2))


def leaf_patch_scores(
    mask_root: Path, size: int, patch: int, max_studies: int = 200
) -> dict[str, np.ndarray]:
    """``{leaf file stem: [studies, g*g] patch_scores}`` over the first ``max_studies`` study
    folders of ``mask_root`` (the generator's ``masks/<study>/<leaf>.png``; ``finding_*`` and
    empty masks are skipped). Masks are resized (nearest) to ``size``: for a size other than the
    data's, an approximation."""
    peaks = patch_peaks(size, patch)
    scores: dict[str, list[np.ndarray]] = {}
    studies = sorted(p for p in Path(mask_root).iterdir() if p.is_dir())[:max_studies]
    if not studies:
        raise FileNotFoundError(f"{mask_root}: no study folders of region masks")
    for study in studies:
        for png in sorted(study.glob("*.png")):
            if png.stem.startswith("finding"):
                continue
            mask = (
                np.asarray(Image.open(png).convert("L").resize((size, size), Image.NEAREST)) > 127
            )
            if mask.any():
                scores.setdefault(png.stem, []).append(patch_scores(mask, peaks))
    return {leaf: np.stack(v) for leaf, v in sorted(scores.items())}


def ceilings(scores: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """From ``leaf_patch_scores``: per leaf, (the mean over studies of each study's best patch, the
    score of the one patch best over all studies together: a map that ignores the image)."""
    return ({leaf: float(s.max(1).mean()) for leaf, s in scores.items()},
            {leaf: float(s.mean(0).max()) for leaf, s in scores.items()})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", required=True, help="the generator's masks/ folder")
    ap.add_argument(
        "--size", type=int, action="append", required=True, help="image size (repeatable)"
    )
    ap.add_argument(
        "--patch", type=int, action="append", required=True, help="patch size, one per --size"
    )
    ap.add_argument("--max-studies", type=int, default=200)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if len(args.size) != len(args.patch):
        ap.error("give one --patch per --size")
    out = {}
    for size, patch in zip(args.size, args.patch):
        per_leaf, fixed = ceilings(
            leaf_patch_scores(Path(args.masks), size, patch, args.max_studies)
        )
        mean, mean_fixed = (
            float(np.mean(list(per_leaf.values()))),
            float(np.mean(list(fixed.values()))),
        )
        out[f"{size}px_patch{patch}"] = {
            "mean_over_leaves": mean,
            "per_leaf": per_leaf,
            "fixed_mean_over_leaves": mean_fixed,
            "fixed_per_leaf": fixed,
        }
        print(
            f"{size} px, patch {patch} ({size // patch}x{size // patch} grid): ceiling {mean:.3f}, "
            f"one fixed patch per leaf {mean_fixed:.3f}"
        )
        print(
            "  " + ", ".join(f"{leaf} {v:.2f} / {fixed[leaf]:.2f}" for leaf, v in per_leaf.items())
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
