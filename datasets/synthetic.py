"""Built-in synthetic chest X-rays: a seeded procedural generator in the R2Gen layout.

    python -m datasets.synthetic --out data/synthetic --n 2000 --size 224 [--seed 0]
    generate(out, n, size=224, seed=0, workers=None) -> Path to annotation.json

The output folder gets a marker file (``MARKER``); a re-run into a folder with it replaces its
images/, masks/ and annotation.json. A non-empty folder without it is refused unless
``--overwrite`` (``overwrite=True``).

Each study is drawn from its own generator ``default_rng([seed, index])`` (the same
output for any number of workers). It draws body soft tissue, both lungs (apex,
hemidiaphragm domes, sharp costophrenic angles), ribs, lung markings, hila, heart,
mediastinum (trachea, carina, aortic knob, SVC border), clavicles, spine and a gastric
bubble, with anatomical variation, rotation/scale/shift jitter, noise and
brightness/contrast/gamma jitter. Display convention: the patient's RIGHT is the
IMAGE'S LEFT. All 25 leaves of the anatomy graph are drawn and written as region masks.

Findings (type -> CheXpert observation -> possible anatomy leaves):

    opacity              Lung Opacity                right/left upper/mid/lower lung zone
    consolidation        Consolidation               right/left mid/lower lung zone
    nodule               Lung Lesion                 right/left upper/mid/lower lung zone
    atelectasis          Atelectasis                 right/left lower lung zone (a band)
    effusion             Pleural Effusion            right/left costophrenic angle (meniscus)
    pneumothorax         Pneumothorax                right/left apical zone (dark cap + pleural edge)
    edema                Edema                       right AND left hilar structures (perihilar haze)
    cardiomegaly         Cardiomegaly                right atrium (+ cavoatrial junction): enlarged heart
    fracture             Fracture                    right/left clavicle (gap + step)
    support_device       Support Devices             cavoatrial junction / superior vena cava (catheter tip)
    widened_mediastinum  Enlarged Cardiomediastinum  upper mediastinum
    hilar_mass           Lung Lesion                 right/left hilar structures
    endotracheal_tube    Support Devices             trachea (tip mid-trachea) / carina (tip at the carina)
    enteric_tube         Support Devices             abdomen (tip in the stomach)
    vertebral_fracture   Fracture                    spine (a flattened, sclerotic vertebral body)
    elevated_hemidiaphragm  (no CheXpert label)      right/left hemidiaphragm
    aortic_calcification    (no CheXpert label)      aortic arch (a dense rim on the aortic knob)

Every leaf of the graph can carry a finding, so report supervision reaches every leaf query.
About 30% of studies are normal; the others have 1-3 findings in distinct leaves. A
bilateral finding (edema) has one ``findings`` entry per side. The heart shadow is split
between the graph's two cardiac-silhouette leaves: the cavoatrial junction is a disc where
the SVC meets the heart's upper right border, the right atrium leaf is the rest of it.
``anatomies`` lists the leaves of the study's findings (both cardiac leaves for
cardiomegaly; the trachea too for a tube tip at the carina); a study without findings
gets [] (no finding leaf). ``views`` is ["PA"] (every image is drawn as a PA film). The dataset
reads its anatomy targets from the report text by default (``data.anatomies: report``);
``anatomies`` stays the generator's ground truth (scripts/text_agreement.py compares the two).
``labels``: 1 for each finding's observation, 0 for an observation a normal sentence
negates, null otherwise; "No Finding" 1 when nothing but support devices and unlabelled
findings is present. The finding catalogue, the planning of a study's findings and the
report text live in datasets/synthetic_reports.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import time
import zlib
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import expit
from tqdm import tqdm

from datasets.synthetic_reports import FINDINGS, SIDES, extra_anatomies, make_report, plan_findings
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()
CLAVICLE_HALF = 0.015                                   # half-thickness: 2 px at 64 px


def leaf_file(name: str) -> str:
    return name.replace(" ", "_") + ".png"


# ----------------------------------------------------------------------------- anatomy

def _sample_anatomy(rng) -> dict:
    u = rng.uniform
    p = {
        "theta": u(-0.07, 0.07),
        "scale": u(0.93, 1.05),
        "shift": (u(-0.03, 0.03), u(-0.03, 0.03)),
        "y_top": u(0.11, 0.15),
        "d_out": u(0.37, 0.40),
        "d_c": u(0.17, 0.20),
        "dome_h": u(0.05, 0.08),
        "y_cp": {"right": u(0.75, 0.79)},
        "w_med": u(0.05, 0.065),
        "w_upper": None,
        "heart": [
            0.5 + u(0.03, 0.055),
            u(0.64, 0.68),
            u(0.145, 0.17),
            u(0.11, 0.125),
            u(0.25, 0.42),
        ],
        "y_car": u(0.33, 0.37),
        "y_hil": {"right": u(0.43, 0.47)},
        "clav": (u(0.17, 0.21), u(0.11, 0.14)),
        "fracture": None,
        "rib_phase": u(0, 1),
        "rib_period": u(0.085, 0.1),
        "tissue": u(0.44, 0.54),
        "lung_dark": u(0.27, 0.34),
    }
    p["y_cp"]["left"] = p["y_cp"]["right"] + u(0.005, 0.035)
    p["heart_floor"] = p["y_cp"]["right"] + 0.02
    p["y_hil"]["left"] = p["y_hil"]["right"] - u(0.0, 0.03)
    return p


def _dome(p, side, d):
    """y of the hemidiaphragm at distance d from the midline."""
    d_peak = 0.19
    k = np.clip(1 - ((d - d_peak) / (p["d_out"] - d_peak)) ** 2, 0, 1)
    return p["y_cp"][side] - p["dome_h"] * k


def _lung_shape(p, side, d, y):
    """The lung outline before the heart and mediastinum are cut out."""
    t = np.clip((y - p["y_top"]) / 0.24, 0, 1)
    w = np.sqrt(1 - (1 - t) ** 2)
    d_lat = p["d_c"] + (p["d_out"] - p["d_c"]) * w
    d_in = p["d_c"] - (p["d_c"] - 0.055) * w
    return (y > p["y_top"]) & (y < _dome(p, side, d)) & (d > d_in) & (d < d_lat)


def _clavicle_y(p, d):
    y0, y1 = p["clav"]
    s = np.clip((d - 0.035) / 0.30, 0, 1)
    return y0 + (y1 - y0) * s + 0.012 * np.sin(np.pi * s)


def _disc(X, Y, cx, cy, r):
    return (X - cx) ** 2 + (Y - cy) ** 2 < r * r


def _seg_dist(X, Y, a, b, reach: float = 0.05):
    """Distance of every point to the segment a-b (``reach`` + 1 beyond ``reach``: not computed)."""
    (ax, ay), (bx, by) = a, b
    near = ((X > min(ax, bx) - reach) & (X < max(ax, bx) + reach)
            & (Y > min(ay, by) - reach) & (Y < max(ay, by) + reach))
    out = np.full(X.shape, reach + 1.0, dtype=np.float32)
    x, y = X[near] - ax, Y[near] - ay
    vx, vy = bx - ax, by - ay
    t = np.clip((x * vx + y * vy) / max(vx * vx + vy * vy, 1e-12), 0, 1)
    out[near] = np.hypot(x - t * vx, y - t * vy)
    return out


def _regions(p, X, Y) -> tuple[dict, dict]:
    """Leaf name -> bool mask, plus helper shapes (full lungs, heart, body ...)."""
    mid = 0.5
    d = {"right": mid - X, "left": X - mid}
    R: dict[str, np.ndarray] = {}
    body = (np.abs(X - 0.5) / 0.47) ** 3 + (np.abs(Y - 0.6) / 0.62) ** 3 < 1
    # mediastinum band, widened in its upper part when asked
    w = np.full_like(X, p["w_med"])
    if p["w_upper"] is not None:
        bump = np.clip(np.minimum((Y - 0.08) / 0.06, (0.47 - Y) / 0.06), 0, 1)
        w = w + (p["w_upper"] - p["w_med"]) * bump
    hx, hy, rx, ry, phi = p["heart"]
    med = (np.abs(X - mid) < w) & (Y < hy) & (Y > 0.0)
    xr = (X - hx) * math.cos(phi) + (Y - hy) * math.sin(phi)
    yr = -(X - hx) * math.sin(phi) + (Y - hy) * math.cos(phi)
    heart = ((xr / rx) ** 2 + (yr / ry) ** 2 < 1) & (Y < p["heart_floor"])
    # the cavoatrial junction: where the SVC border meets the top of the heart
    x_caj = mid - p["w_med"] + 0.002
    ys = np.linspace(hy - ry - rx, hy, 400)
    xr_c = (x_caj - hx) * math.cos(phi) + (ys - hy) * math.sin(phi)
    yr_c = -(x_caj - hx) * math.sin(phi) + (ys - hy) * math.cos(phi)
    inside = (xr_c / rx) ** 2 + (yr_c / ry) ** 2 < 1
    y_caj = float(ys[inside.argmax()]) + 0.012 if inside.any() else hy - 0.8 * ry
    caj = _disc(X, Y, x_caj, y_caj, 0.035)
    R["cavoatrial junction"] = caj
    R["right atrium"] = heart & ~caj
    R["superior vena cava"] = (np.abs(X - x_caj) < 0.03) & (Y > 0.2) & (Y < y_caj - 0.02)
    R["trachea"] = (np.abs(X - mid) < 0.016) & (Y < p["y_car"]) & body
    R["carina"] = _disc(X, Y, mid, p["y_car"] + 0.01, 0.028)
    R["aortic arch"] = _disc(X, Y, mid + p["w_med"] + 0.01, 0.335, 0.032)
    R["upper mediastinum"] = med & (Y > 0.12) & (Y < 0.42)
    R["spine"] = (np.abs(X - mid) < 0.033) & body
    lungs, domes, bones = {}, {}, {}
    for s in SIDES:
        ds = d[s]
        lung = _lung_shape(p, s, ds, Y) & ~heart & ~med & ~R["aortic arch"]
        lungs[s] = lung
        dome = _dome(p, s, ds)
        domes[s] = dome
        y_top, y_cp = p["y_top"], p["y_cp"][s]
        h = (y_cp - y_top) / 3
        R[f"{s} upper lung zone"] = lung & (Y < y_top + h)
        R[f"{s} mid lung zone"] = lung & (Y >= y_top + h) & (Y < y_top + 2 * h)
        R[f"{s} lower lung zone"] = lung & (Y >= y_top + 2 * h)
        R[f"{s} apical zone"] = lung & (Y < y_top + 0.12)
        R[f"{s} costophrenic angle"] = lung & (Y > y_cp - 0.18) & (ds > p["d_out"] - 0.21)
        R[f"{s} hemidiaphragm"] = ((Y > dome - 0.012) & (Y < dome + 0.035) & (ds > 0.02)
                                   & (ds < p["d_out"] + 0.01) & ~heart)
        R[f"{s} hilar structures"] = (
            ((ds - 0.115) / 0.075) ** 2 + ((Y - p["y_hil"][s]) / 0.095) ** 2 < 1
        ) & (ds > 0.04)
        y_cl = _clavicle_y(p, ds)
        bone = (np.abs(Y - y_cl) < CLAVICLE_HALF) & (ds > 0.035) & (ds < 0.335)
        clav_region = bone
        fr = p["fracture"]
        if fr is not None and fr["side"] == s:   # a gap at d_f, the lateral fragment displaced down
            lat = ds > fr["d"]
            shifted = (np.abs(Y - y_cl - fr["step"]) < CLAVICLE_HALF) & lat & (ds < 0.335)
            gap = ((np.abs(ds - fr["d"]) < fr["gap"] / 2)
                   & (np.abs(Y - y_cl - fr["step"] / 2) < CLAVICLE_HALF + fr["step"]))
            bone = ((bone & ~lat) | shifted) & ~gap
            clav_region = bone | gap
        R[f"{s} clavicle"] = clav_region
        bones[s] = bone
    below = np.where(X < mid, domes["right"], domes["left"]) + 0.035
    R["abdomen"] = body & (Y > below) & (np.abs(X - mid) < p["d_out"] + 0.03) & (Y > 0.55)
    extra = {"body": body, "lungs": lungs, "heart": heart, "med": med, "d": d, "y_caj": y_caj,
             "x_caj": x_caj, "domes": domes, "clavicle bones": bones}
    return R, extra


# ----------------------------------------------------------------------------- drawing

def _blur(a, sigma):
    return ndimage.gaussian_filter(a, sigma, mode="nearest")


@lru_cache(maxsize=16)
def _noise_bank(size: int, sigma: float, k: int = 4) -> np.ndarray:
    """``k`` seamless (wrap-filtered) smooth noise fields, unit std, same in every process."""
    n = np.random.default_rng(1234).standard_normal((k, size, size)).astype(np.float32)
    n = np.stack([ndimage.gaussian_filter(f, sigma, mode="wrap") for f in n])
    return n / n.std(axis=(1, 2), keepdims=True)


def _smooth_noise(rng, shape, sigma):
    """Smooth unit-std noise: a randomly chosen, rolled and flipped field of the bank."""
    bank = _noise_bank(shape[0], round(float(sigma), 2))
    f = np.roll(bank[rng.integers(len(bank))], tuple(rng.integers(shape[0], size=2)), axis=(0, 1))
    return f[::-1] if rng.random() < 0.5 else f


def _blur_local(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a bool mask computed on its bounding box only (a mask's blur is 0 far
    from it)."""
    out = np.zeros(mask.shape, np.float32)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return out
    pad = int(4 * sigma) + 2
    sl = (
        slice(max(rows[0] - pad, 0), rows[-1] + pad + 1),
        slice(max(cols[0] - pad, 0), cols[-1] + pad + 1),
    )
    out[sl] = ndimage.gaussian_filter(mask[sl].astype(np.float32), sigma, mode="constant")
    return out


def _draw_base(p, R, E, X, Y, rng, px):
    """Normal anatomy intensities in [0, 1] (before findings and noise)."""
    S = X.shape[0]
    mid = 0.5
    img = np.where(E["body"], p["tissue"] + 0.06 * (Y - 0.5), 0.04).astype(np.float32)
    lung = (E["lungs"]["right"] | E["lungs"]["left"]).astype(np.float32)
    lung_soft = _blur(lung, 1.2 * px)
    # ribs: bands curving down laterally, only seen over the lungs
    dd = np.abs(X - mid)
    rib = 0.5 + 0.5 * np.cos(
        2 * np.pi * ((Y - 0.9 * dd**2 - 0.15 * dd) / p["rib_period"] + p["rib_phase"])
    )
    markings = _smooth_noise(rng, (S, S), 1.5 * px)
    img -= p["lung_dark"] * lung_soft
    img += lung_soft * (0.06 * (rib > 0.75) + 0.025 * markings)
    for s in SIDES:  # hilar vessels
        hil = np.exp(-(((E["d"][s] - 0.1) / 0.045) ** 2 + ((Y - p["y_hil"][s]) / 0.06) ** 2))
        img += 0.1 * hil * lung_soft
    img += 0.12 * E["med"] + 0.15 * E["heart"] + 0.12 * R["aortic arch"]
    img += 0.08 * (
        R["superior vena cava"]
        & ~E["lungs"]["right"]
        & (X < mid - p["w_med"] + 0.002)
        & (X > mid - p["w_med"] - 0.018)
    )
    sp = R["spine"]
    img[sp] += 0.1 + 0.02 * np.cos(2 * np.pi * Y[sp] / 0.05)   # vertebral bodies
    img -= 0.16 * R["trachea"]
    for sgn in (-1, 1):  # main bronchi
        bro = _seg_dist(X, Y, (mid, p["y_car"]), (mid + sgn * 0.07, p["y_car"] + 0.07)) < 0.008
        img -= 0.1 * bro
    img += 0.22 * (E["clavicle bones"]["right"] | E["clavicle bones"]["left"])
    gastric = (
        ((X - mid - 0.19) / 0.07) ** 2 + ((Y - E["domes"]["left"] - 0.06) / 0.04) ** 2 < 1
    ) & R["abdomen"]
    img -= 0.2 * gastric
    return img, lung_soft


def _pick_center(zone, X, Y, rng, margin_px):
    """A point of ``zone`` (canonical coordinates), preferably ``margin_px`` inside its border."""
    pts = np.flatnonzero(zone)
    if pts.size == 0:
        return float(X.mean()), float(Y.mean())
    S = zone.shape[0]
    m = max(int(round(margin_px)), 1)
    dirs = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]
    for margin in (m, m // 2):          # a point whose 8 neighbours at ``margin`` are in the zone
        for _ in range(40):
            k = int(pts[rng.integers(pts.size)])
            i, j = divmod(k, S)
            if all(
                0 <= i + a * margin < S
                and 0 <= j + b * margin < S
                and zone[i + a * margin, j + b * margin]
                for a, b in dirs
            ):
                return float(X.flat[k]), float(Y.flat[k])
    k = pts[rng.integers(pts.size)]
    return float(X.flat[k]), float(Y.flat[k])


def _tube(X, Y, path, half_width: float, r_unit: float) -> np.ndarray:
    """A polyline through ``path`` (canonical points): 1 on the line, 0 off it, a one-pixel soft
    edge (``r_unit`` pixels per canonical unit)."""
    dist = np.minimum.reduce([_seg_dist(X, Y, a, b) for a, b in zip(path[:-1], path[1:])])
    return np.clip((half_width - dist) * r_unit + 0.5, 0, 1)


def _draw_findings(events, p, R, E, X, Y, img, lung_soft, rng, px, S):
    """Add each finding to ``img`` in place; return (type, leaf, mask, event index) per finding
    entry (bilateral edema gives two entries for one event)."""
    out, owners = [], []
    r_unit = S * p["scale"]          # pixels per canonical unit
    wide_tube = max(0.007, 0.9 / r_unit)   # half-width of an endotracheal / enteric tube
    for k, ev in enumerate(events):
        t, leaf = ev["type"], ev["leaf"]
        if t in ("opacity", "consolidation", "nodule", "atelectasis"):
            zone = R[leaf]
            zone_soft = _blur_local(zone, 1.0 * px)
            if t == "nodule":
                r = rng.uniform(0.02, 0.028)
                cx, cy = _pick_center(zone, X, Y, rng, r * r_unit)
                rho = np.hypot(X - cx, Y - cy)
                g = np.clip((r - rho) / 0.008 + 0.5, 0, 1)
                img += rng.uniform(0.36, 0.44) * g
                mask = (rho < r) & zone
            elif t == "atelectasis":
                cx, cy = _pick_center(zone, X, Y, rng, 0.04 * r_unit)
                a, L, w = (
                    rng.uniform(-0.35, 0.35),
                    rng.uniform(0.07, 0.1),
                    rng.uniform(0.011, 0.016),
                )
                dist = _seg_dist(X, Y, (cx - L * math.cos(a), cy - L * math.sin(a)),
                                 (cx + L * math.cos(a), cy + L * math.sin(a)))
                g = np.clip((w - dist) / 0.008 + 0.5, 0, 1) * zone_soft
                img += rng.uniform(0.32, 0.4) * g
                mask = (dist < w) & zone
            else:
                big = t == "consolidation"
                r = rng.uniform(0.07, 0.095) if big else rng.uniform(0.045, 0.065)
                cx, cy = _pick_center(zone, X, Y, rng, 0.6 * r * r_unit)
                rho2 = ((X - cx) ** 2 + (Y - cy) ** 2) / (r * r)
                g = np.exp(-rho2 ** 2) if big else np.exp(-rho2 / 2)
                tex = _smooth_noise(rng, (S, S), (1.0 if big else 2.5) * px)
                g = g * (0.8 + 0.2 * tex) * zone_soft
                img += (rng.uniform(0.38, 0.46) if big else rng.uniform(0.28, 0.34)) * g
                if big:   # air bronchograms
                    for _ in range(2):
                        a = rng.uniform(0, 2 * math.pi)
                        bro = (
                            _seg_dist(
                                X,
                                Y,
                                (cx, cy),
                                (cx + 0.6 * r * math.cos(a), cy + 0.6 * r * math.sin(a)),
                            )
                            < 0.005
                        )
                        img -= 0.12 * bro * g
                mask = (g > (0.5 if big else 0.35)) & zone
            out.append((t, leaf, mask))
        elif t == "effusion":
            s = leaf.split()[0]
            ds, y_cp = E["d"][s], p["y_cp"][s]
            h = rng.uniform(0.13, 0.19)
            H = h * (0.35 + 0.65 * np.clip((ds - 0.1) / (p["d_out"] - 0.1), 0, 1) ** 1.5)
            level = Y - (y_cp - H)
            lung = E["lungs"][s]
            g = expit(level / 0.006) * _blur_local(lung, 1.0 * px)
            img += rng.uniform(0.3, 0.36) * g
            out.append((t, leaf, (level > 0) & lung))
        elif t == "pneumothorax":
            s = leaf.split()[0]
            ds, sh = E["d"][s], rng.uniform(0.07, 0.1)
            collapsed = _lung_shape(p, s, ds + 0.4 * sh, Y - sh)
            apex = R[leaf]
            ptx = apex & ~collapsed
            edge = collapsed & ~ndimage.binary_erosion(collapsed, iterations=max(1, round(px)))
            edge &= E["lungs"][s] & (Y < p["y_top"] + 0.13)
            m = _blur_local(ptx, 0.7 * px)   # air: darker, no lung markings
            img[:] = img * (1 - m) + (_blur(img, 3 * px) - 0.14) * m + 0.3 * edge
            out.append((t, leaf, ptx))
        elif t == "edema":
            g = {}
            for s in SIDES:
                g[s] = np.exp(
                    -(((E["d"][s] - 0.12) / 0.06) ** 2 + ((Y - p["y_hil"][s]) / 0.08) ** 2) / 2
                )
            tex = _smooth_noise(rng, (S, S), 1.5 * px)
            amp = rng.uniform(0.25, 0.3)
            img += amp * (g["right"] + g["left"]) * (0.85 + 0.15 * tex) * lung_soft
            for s in SIDES:
                out.append((t, f"{s} hilar structures", (g[s] > 0.5) & E["lungs"][s]))
        elif t == "cardiomegaly":
            out.append((t, leaf, R["right atrium"] | R["cavoatrial junction"]))   # drawn via params
        elif t == "widened_mediastinum":
            # drawn via params
            out.append((t, leaf, R["upper mediastinum"]))
        elif t == "fracture":
            fr = p["fracture"]
            near = np.abs(E["d"][fr["side"]] - fr["d"]) < 0.04
            out.append((t, leaf, R[leaf] & near))
        elif t == "hilar_mass":
            s = leaf.split()[0]
            r = rng.uniform(0.035, 0.045)
            cx = 0.5 + (-1 if s == "right" else 1) * rng.uniform(0.1, 0.13)
            cy = p["y_hil"][s] + rng.uniform(-0.02, 0.02)
            rho = np.hypot(X - cx, Y - cy)
            img += rng.uniform(0.3, 0.36) * np.clip((r - rho) / 0.008 + 0.5, 0, 1)
            out.append((t, leaf, (rho < r) & R[leaf]))
        # down the trachea; tip mid-trachea, or at the carina (too low)
        elif t == "endotracheal_tube":
            y_tip = p["y_car"] + (
                rng.uniform(-0.005, 0.01) if leaf == "carina" else -rng.uniform(0.08, 0.13)
            )
            tip = (0.5 + rng.uniform(-0.004, 0.004), y_tip)
            path = [(0.5 + rng.uniform(-0.01, 0.01), 0.0), tip]
            img += 0.5 * _tube(X, Y, path, wide_tube, r_unit)
            out.append((t, leaf, _disc(X, Y, tip[0], tip[1], 0.035) & R[leaf]))
        # down the oesophagus, through the left dome, into the stomach
        elif t == "enteric_tube":
            # top of the left dome
            y_dome = p["y_cp"]["left"] - p["dome_h"]
            tip = (0.5 + rng.uniform(0.15, 0.22), y_dome + rng.uniform(0.07, 0.1))
            path = [
                (0.5 - 0.01, 0.0),
                (0.5 + 0.015, p["y_car"] + 0.05),
                (0.5 + 0.04, y_dome + 0.02),
                tip,
            ]
            img += 0.5 * _tube(X, Y, path, wide_tube, r_unit)
            out.append((t, leaf, _disc(X, Y, tip[0], tip[1], 0.035) & R[leaf]))
        # a flattened, sclerotic vertebral body, wider than the column
        elif t == "vertebral_fracture":
            y_f = rng.uniform(0.3, 0.6)
            band = (np.abs(Y - y_f) < 0.016) & (np.abs(X - 0.5) < 0.045)
            img += rng.uniform(0.26, 0.32) * _blur_local(band, 0.5 * px)
            out.append((t, leaf, R[leaf] & (np.abs(Y - y_f) < 0.03)))
        elif t == "elevated_hemidiaphragm":
            # drawn via params
            out.append((t, leaf, R[leaf]))
        elif t == "aortic_calcification":   # a dense rim on the aortic knob
            cx, cy = 0.5 + p["w_med"] + 0.01, 0.335
            rho = np.hypot(X - cx, Y - cy)
            img += (
                rng.uniform(0.26, 0.32) * np.clip((0.036 - rho) / 0.008 + 0.5, 0, 1) * (rho > 0.01)
            )
            out.append((t, leaf, R[leaf]))
        elif t == "support_device":
            x_caj, y_caj = E["x_caj"], E["y_caj"]
            tip = (
                (x_caj, y_caj)
                if leaf == "cavoatrial junction"
                else (x_caj, rng.uniform(0.29, y_caj - 0.1))
            )
            if ev["entry"] == "right":
                path = [
                    (0.5 - rng.uniform(0.17, 0.22), 0.02),
                    (x_caj - 0.01, 0.19),
                    (x_caj, 0.24),
                    tip,
                ]
            else:
                path = [
                    (0.5 + rng.uniform(0.26, 0.3), 0.23),
                    (0.5 + 0.06, 0.215),
                    (x_caj + 0.005, 0.235),
                    tip,
                ]
            img += 0.45 * _tube(X, Y, path, max(0.0045, 0.6 / r_unit), r_unit)
            out.append((t, leaf, _disc(X, Y, tip[0], tip[1], 0.025) & R[leaf]))
        owners += [k] * (len(out) - len(owners))
    return [(*entry, k) for entry, k in zip(out, owners)]


# ----------------------------------------------------------------------------- one study

def render_study(index: int, size: int = 224, seed: int = 0, normal_frac: float = 0.3) -> dict:
    """Draw one study in memory: {"image": uint8 [S,S], "regions": {leaf: bool [S,S]},
    "findings": [{"type", "observation", "anatomy", "mask": bool [S,S]}], "report", "labels",
    "anatomies"}."""
    rng = np.random.default_rng([seed, index])
    p = _sample_anatomy(rng)
    events = plan_findings(rng, normal_frac)
    types = {ev["type"] for ev in events}
    if "cardiomegaly" in types:
        p["heart"][2] *= rng.uniform(1.35, 1.5)
        p["heart"][3] *= rng.uniform(1.15, 1.25)
        p["heart"][0] += 0.015
    if "widened_mediastinum" in types:
        p["w_upper"] = rng.uniform(0.105, 0.125)
    for ev in events:
        if ev["type"] == "fracture":
            p["fracture"] = {"side": ev["leaf"].split()[0], "d": rng.uniform(0.13, 0.25),
                             "gap": rng.uniform(0.03, 0.04), "step": rng.uniform(0.035, 0.045)}
        # that lung base ends well above the other one
        elif ev["type"] == "elevated_hemidiaphragm":
            side = ev["leaf"].split()[0]
            p["y_cp"][side] = p["y_cp"]["left" if side == "right" else "right"] - rng.uniform(
                0.045, 0.065
            )
    # canonical coordinates of every pixel centre (inverse of the rotation/scale/shift jitter)
    S = size
    px = S / 224.0
    v, u = (np.mgrid[0:S, 0:S].astype(np.float32) + 0.5) / S
    cos, sin = math.cos(p["theta"]), math.sin(p["theta"])
    du, dv = u - 0.5 - p["shift"][0], v - 0.5 - p["shift"][1]
    X = (0.5 + (cos * du + sin * dv) / p["scale"]).astype(np.float32)
    Y = (0.5 + (-sin * du + cos * dv) / p["scale"]).astype(np.float32)

    R, E = _regions(p, X, Y)
    img, lung_soft = _draw_base(p, R, E, X, Y, rng, px)
    found = _draw_findings(events, p, R, E, X, Y, img, lung_soft, rng, px, S)
    img = _blur(img, 0.6 * px)
    img += rng.uniform(0.012, 0.028) * rng.standard_normal((S, S)).astype(np.float32)
    img = (img - 0.4) * rng.uniform(0.85, 1.15) + 0.4 + rng.uniform(-0.05, 0.05)
    # gamma
    lut = ((np.linspace(0, 1, 1024) ** rng.uniform(0.85, 1.15)) * 255 + 0.5).astype(np.uint8)
    image = lut[(np.clip(img, 0, 1) * 1023 + 0.5).astype(np.int32)]

    report, labels, sentences = make_report(events, rng)
    anat = {lf for t, lf, _, _ in found} | {a for ev in events for a in extra_anatomies(ev)}
    anatomies = [n for n in GRAPH.leaf_names if n in anat]
    findings = [{"type": t, "observation": FINDINGS[t][0], "anatomy": lf, "mask": m, "sentence": sentences[k]}
                for t, lf, m, k in found]
    return {"image": image, "regions": {n: R[n] for n in GRAPH.leaf_names}, "findings": findings,
            "report": report, "labels": labels, "anatomies": anatomies}


def _png(arr: np.ndarray, path: Path, up_filter: bool = False) -> None:
    """8-bit grayscale PNG, zlib level 1 (4x faster than PIL for masks); optionally the
    PNG "Up" filter (smaller files for images)."""
    h, w = arr.shape
    raw = np.zeros((h, w + 1), np.uint8)
    raw[:, 1:] = arr
    if up_filter:
        raw[1:, 1:] = arr[1:] - arr[:-1]    # uint8 wrap-around is what PNG expects
        raw[1:, 0] = 2

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))


def _write_study(job) -> dict:
    index, out, size, seed, split, normal_frac = job
    out = Path(out)
    st = render_study(index, size, seed, normal_frac)
    sid = f"syn{index:06d}"
    mdir = out / "masks" / sid
    mdir.mkdir(parents=True, exist_ok=True)
    _png(st["image"], out / "images" / f"{sid}.png", up_filter=True)
    regions = {}
    for name, m in st["regions"].items():
        rel = f"masks/{sid}/{leaf_file(name)}"
        _png(m.astype(np.uint8) * 255, out / rel)
        regions[name] = rel
    findings = []
    for k, f in enumerate(st["findings"]):
        rel = f"masks/{sid}/finding_{k}.png"
        _png(f["mask"].astype(np.uint8) * 255, out / rel)
        findings.append(
            {
                "type": f["type"],
                "observation": f["observation"],
                "anatomy": f["anatomy"],
                "mask": rel,
                "sentence": f["sentence"],
            }
        )
    return {
        "id": sid,
        "report": st["report"],
        "image_path": [f"{sid}.png"],
        "views": ["PA"],
        "split": split,
        "labels": st["labels"],
        "anatomies": st["anatomies"],
        "findings": findings,
        "regions": regions,
    }


MARKER = ".synthetic-data"


def claim_folder(out: Path, overwrite: bool = False) -> None:
    """Make ``out`` this generator's folder (its MARKER file). FileExistsError for a file, or for a
    non-empty folder without the marker unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty and was not made by datasets.synthetic (no {MARKER} file): "
            "its images/, masks/ and annotation.json would be replaced. Choose a new folder, or "
            "pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m datasets.synthetic, which replaces images/, "
                              "masks/ and annotation.json here when run again\n")


def generate(out, n: int, size: int = 224, seed: int = 0, workers: int | None = None,
             val_frac: float = 0.1, test_frac: float = 0.1, normal_frac: float = 0.3,
             progress: bool = False, overwrite: bool = False) -> Path:
    """Write ``n`` studies under ``out`` (R2Gen layout + masks); returns the annotation.json path.
    The images/ and masks/ of an earlier run are replaced; a non-empty folder that this generator
    did not make is refused (FileExistsError) unless ``overwrite``."""
    out = Path(out)
    claim_folder(out, overwrite)
    for sub in ("images", "masks"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_frac)) if test_frac > 0 and n >= 3 else 0
    n_val = max(1, round(n * val_frac)) if val_frac > 0 and n >= 3 else 0
    split_of = np.full(n, "train", dtype=object)
    split_of[order[:n_test]] = "test"
    split_of[order[n_test:n_test + n_val]] = "val"
    jobs = [(i, str(out), size, seed, str(split_of[i]), normal_frac) for i in range(n)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and n > 1:
        with Pool(min(workers, n)) as pool:
            it = pool.imap(_write_study, jobs, chunksize=max(1, min(32, n // (4 * workers))))
            records = list(_progress(it, n, progress))
    else:
        records = list(_progress(map(_write_study, jobs), n, progress))
    ann = {sp: [r for r in records if r["split"] == sp] for sp in ("train", "val", "test")}
    path = out / "annotation.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(ann, f)
    os.replace(tmp, path)
    return path


def _progress(it, total, show):
    if not show:
        return it
    return tqdm(it, total=total, desc="synthetic studies", unit="study")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Generate synthetic chest X-rays in the R2Gen layout.")
    ap.add_argument("--out", required=True,
                    help="output folder: annotation.json, images/, masks/ (all replaced when this "
                         "folder was made by an earlier run)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty folder that this generator did not make, deleting "
                         "its images/ and masks/")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--normal-frac", type=float, default=0.3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        claim_folder(Path(args.out), args.overwrite)
    except FileExistsError as e:
        ap.error(str(e))
    path = generate(
        args.out,
        args.n,
        args.size,
        args.seed,
        args.workers,
        args.val_frac,
        args.test_frac,
        args.normal_frac,
        progress=True,
    )
    dt = time.perf_counter() - t0
    with open(path) as f:
        counts = {k: len(v) for k, v in json.load(f).items()}
    print(f"wrote {path} ({counts}) in {dt:.1f} s: {args.n / dt:.1f} studies/s "
          f"with {args.workers or os.cpu_count()} workers")


if __name__ == "__main__":
    main()
