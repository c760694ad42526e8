"""Does the demo model learn? Its test-split figures beside a trivial baseline, against the demo
targets.

    python scripts/demo_summary.py --config configs/demo_report.yaml \
        --eval-dir output/demo_report/eval_test --out output/demo_report/summary.json

Reads ``metrics.json`` and ``generated.jsonl`` written by ``main_report.py --eval``
(engine/evaluate.py: language metrics, clinical efficacy with the configured labeler, and grounding
against the synthetic generator's masks). The baseline writes the most common training report for
every test image and is scored by the same ``engine.evaluate.score_reports``. Grounding has no
baseline model; beside it stands the pointing-game accuracy of a peak placed at random (the mean
area fraction of the leaf masks). Targets: clinical-efficacy
micro-F1 (14 observations) >= 0.70 and clearly above the baseline, BLEU-4 >= 0.30, pointing game >=
0.60 (over every leaf the generator draws; the pointing game over the leaves of the findings is
shown too), mean signed finding CNR > 0.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.annotation import load_annotation  # noqa: E402
from engine.evaluate import score_reports  # noqa: E402
from metrics.synthetic_grounding import read_mask  # noqa: E402
from utils.config import add_config_args, load_config  # noqa: E402
from vocab.report_text import clean_report  # noqa: E402

# (metric key, label, target, kind): kind "min" = at least target, "pos" = above 0
TARGETS = [("ce_micro_f1_14", "clinical micro-F1 (14 obs)", 0.70, "min"),
           ("BLEU_4", "BLEU-4", 0.30, "min"),
           ("pointing_game", "pointing game (leaves)", 0.60, "min"),
           ("cnr", "finding CNR (signed) under its leaf map", 0.0, "pos")]
# prior_*: the location prior alone as every image's map (what the model's own maps add to it)
SHOWN = [
    "pointing_game_tol15",
    "pointing_game_findings",
    "prior_pointing_game",
    "prior_pointing_game_findings",
    "prior_cnr",
    "BLEU_1",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "ce_micro_f1_5",
    "ce_macro_f1_14",
    "ce_example_f1_14",
]
# "clearly worse": baseline clinical micro-F1 at least this far below the model's
BASELINE_MARGIN = 0.15


def most_common_report(annotation: str) -> tuple[str, int]:
    """The most frequent cleaned training report and its count (ties: the first seen)."""
    counts = collections.Counter(
        clean_report(r["report"]) for r in load_annotation(annotation, "train")
    )
    return counts.most_common(1)[0]


def chance_pointing(annotation: str, split: str) -> float | None:
    """Pointing game of a uniformly random peak: mean over studies and drawn leaves of the mask's
    area fraction."""

    root = Path(annotation).parent
    fracs = []
    for rec in load_annotation(annotation, split):
        for rel in (rec.get("regions") or {}).values():
            m = read_mask(root / rel)
            if m.any():
                fracs.append(float(m.mean()))
    return float(np.mean(fracs)) if fracs else None


def score_baseline(rows: list[dict], report: str, cfg) -> dict:
    scored = [
        {"index": i, "generated": report, "reference": r["reference"]} for i, r in enumerate(rows)
    ]
    # score_reports prints the clinical-efficacy table
    with contextlib.redirect_stdout(io.StringIO()):
        out = score_reports(scored, cfg)
    return out[0] if isinstance(out, tuple) else out


def check(value, target: float, kind: str) -> bool | None:
    if value is None:
        return None
    return value > target if kind == "pos" else value >= target


def summarize(model: dict, baseline: dict, chance: float | None) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for key, label, target, kind in TARGETS:
        value = model.get(key)
        passed = check(value, target, kind)
        ok = ok and bool(passed)
        base = chance if key == "pointing_game" else baseline.get(key)
        rows.append(
            {
                "metric": key,
                "label": label,
                "target": (f"> {target:g}" if kind == "pos" else f">= {target:g}"),
                "model": value,
                "baseline": base,
                "pass": passed,
            }
        )
    f_model, f_base = model.get("ce_micro_f1_14"), baseline.get("ce_micro_f1_14")
    clear = f_model is not None and f_base is not None and f_base <= f_model - BASELINE_MARGIN
    ok = ok and clear
    rows.append(
        {
            "metric": "baseline_margin",
            "label": "baseline clearly worse on clinical F1",
            "target": f"<= model - {BASELINE_MARGIN:g}",
            "model": f_model,
            "baseline": f_base,
            "pass": clear,
        }
    )
    for key in SHOWN:
        rows.append({"metric": key, "label": key, "target": "", "model": model.get(key),
                     "baseline": baseline.get(key), "pass": None})
    return rows, ok


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'metric':34} {'target':>16} {'model':>9} {'baseline':>9}  result",
             "-" * 80]
    for r in rows:
        res = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(
            f"{r['label']:34} {r['target']:>16} {_fmt(r['model']):>9} {_fmt(r['baseline']):>9}  {res}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--eval-dir", required=True, help="folder with metrics.json and generated.jsonl")
    p.add_argument("--out", default=None, help="summary JSON (default: EVAL_DIR/summary.json)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    eval_dir = Path(args.eval_dir)
    model = json.loads((eval_dir / "metrics.json").read_text())
    with open(eval_dir / "generated.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    report, count = most_common_report(cfg.data.annotation)
    baseline = score_baseline(rows, report, cfg)
    chance = chance_pointing(cfg.data.annotation, cfg.eval.split)
    table, ok = summarize(model, baseline, chance)
    print(
        f"SS-ACL demo on the synthetic {cfg.eval.split} split ({len(rows)} studies); baseline: the most common "
        f"training report ({count}x) for every image; pointing-game baseline: a random peak (chance)."
    )
    print(format_table(table))
    by_leaf = model.get("pointing_game_by_leaf") or {}
    if by_leaf:
        print("pointing game by leaf: " + ", ".join(f"{leaf} {v:.2f}" for leaf, v in
                                                    sorted(by_leaf.items(), key=lambda kv: -kv[1])))
    print("ALL TARGETS MET" if ok else "SOME TARGETS NOT MET (see FAIL rows)")
    out = {
        "split": cfg.eval.split,
        "num_studies": len(rows),
        "baseline_report": report,
        "baseline_report_count": count,
        "chance_pointing_game": chance,
        "rows": table,
        "all_pass": ok,
        "model": model,
        "baseline": baseline,
    }
    path = Path(args.out) if args.out else eval_dir / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
