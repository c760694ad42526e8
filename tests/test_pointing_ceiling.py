import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pointing_ceiling.py"
spec = importlib.util.spec_from_file_location("pointing_ceiling", SCRIPT)
pointing_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pointing_ceiling)


def column(size, x0, x1):
    m = np.zeros((size, size), bool)
    m[:, x0:x1 + 1] = True
    return m


def test_one_patch_map_peaks_at_its_patch_centre():
    peaks = pointing_ceiling.patch_peaks(32, 8)                 # 4 x 4 grid
    assert peaks.shape == (16, 32, 32)
    # row 1, column 2: pixels 8..15 x 16..23
    ys, xs = np.nonzero(peaks[4 + 2])
    assert set(ys) <= {11, 12} and set(xs) <= {19, 20}


def test_a_region_between_patch_centres_cannot_be_hit():
    peaks = pointing_ceiling.patch_peaks(32, 8)
    # through centres
    assert pointing_ceiling.patch_scores(column(32, 11, 12), peaks).max() == 1.0
    # on a patch boundary
    assert pointing_ceiling.patch_scores(column(32, 15, 16), peaks).max() == 0.0


def save(path: Path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_ceiling_averages_per_leaf_and_skips_finding_and_empty_masks(tmp_path):
    save(tmp_path / "s1" / "a.png", column(32, 11, 12))
    save(tmp_path / "s1" / "b.png", column(32, 15, 16))
    save(tmp_path / "s1" / "c.png", np.zeros((32, 32), bool))
    save(tmp_path / "s1" / "finding_0.png", column(32, 11, 12))
    save(tmp_path / "s2" / "a.png", column(32, 15, 16))
    per_study, _ = pointing_ceiling.ceilings(pointing_ceiling.leaf_patch_scores(tmp_path, 32, 8))
    assert per_study == {"a": 0.5, "b": 0.0}
    out = tmp_path / "ceiling.json"
    pointing_ceiling.main(
        ["--masks", str(tmp_path), "--size", "32", "--patch", "8", "--json", str(out)]
    )
    assert json.loads(out.read_text())["32px_patch8"]["mean_over_leaves"] == 0.25


def test_fixed_ceiling_takes_one_patch_for_every_study(tmp_path):
    """Leaf "a" lies on patch column 1 in one study and column 2 in the other: each study's best
    patch hits (1.0), but no single patch hits both (0.5)."""
    save(tmp_path / "s1" / "a.png", column(32, 11, 12))
    save(tmp_path / "s2" / "a.png", column(32, 19, 20))
    per_study, fixed = pointing_ceiling.ceilings(
        pointing_ceiling.leaf_patch_scores(tmp_path, 32, 8)
    )
    assert per_study == {"a": 1.0} and fixed == {"a": 0.5}
    out = tmp_path / "ceiling.json"
    pointing_ceiling.main(
        ["--masks", str(tmp_path), "--size", "32", "--patch", "8", "--json", str(out)]
    )
    assert json.loads(out.read_text())["32px_patch8"]["fixed_mean_over_leaves"] == 0.5
