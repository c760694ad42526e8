"""Does the method ground? SS-ACL pretraining with and without its grounding losses, several seeds,
scored by the grounding of the leaf queries' heatmaps on the validation split.

    python scripts/ablate.py                                         # demo config, its budget
    python scripts/ablate.py --set data.max_samples=6000 --seeds 0,1,2 --single no_aca,no_region
    python scripts/ablate.py --seeded full,no_region_aca,evidence --single no_aca,no_region,location_prior
    python scripts/ablate.py --split test --seeds 0,1,2              # once, for the final table

Each run is ``main_pretrain.py --config CONFIG`` with the variant's overrides and ``seed``, then
``main_report.py --eval --grounding-only`` on its best checkpoint (no report is generated): the
anatomy pointing game over every drawn leaf, finding-level localisation (each finding's own mask
under the map of its sentence) and the finding CNR. The table gives mean +- std over seeds and, for
the full model against ``no_region_aca``, the gap in units of the larger std. Everything lands in
OUT/<variant>_s<seed>/ and OUT/ablation_<split>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "full": [],
    "no_region_aca": ["loss.region.weight=0", "loss.aca.weight=0"],
    "no_aca": ["loss.aca.weight=0"],
    "no_region": ["loss.region.weight=0"],
    "location_prior": ["model.location_prior.enabled=true", "loss.rest.weight=1"],
    "evidence": ["loss.aca.input=evidence", "loss.region.input=evidence"],
}
ROWS = [("finding_pointing_game", "finding-level pointing game"),
        ("finding_cnr", "finding-level CNR (sentence map)"),
        ("pointing_game", "anatomy pointing game (all leaves)"),
        ("pointing_game_findings", "pointing game, finding leaves"),
        ("cnr", "finding CNR (its leaf's map)")]


def _run(args: list[str]) -> float:
    cmd = [sys.executable, *args]
    print("[ablate] $ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=str(ROOT))
    return time.time() - t0


def run_one(variant: str, seed: int, out: Path, config: str, sets: list[str], split: str) -> dict:
    """Pretrain one (variant, seed) unless its checkpoint exists, then score its grounding on ``split``."""
    name = f"{variant}_s{seed}"
    common = [f"output_dir={out}", f"run_name={name}", f"seed={seed}", *sets, *VARIANTS[variant]]
    ckpt = out / name / "checkpoint-best.pth"
    seconds = 0.0 if ckpt.is_file() else _run(["main_pretrain.py", "--config", config, "--set", *common])
    _run(["main_report.py", "--config", config, "--eval", "--grounding-only", "--checkpoint", str(ckpt),
          "--set", *common, f"eval.split={split}"])
    metrics = json.loads((out / name / f"eval_{split}" / "grounding.json").read_text())
    return {"metrics": metrics, "pretrain_s": seconds}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> metric -> (mean, std over seeds (0 for one), number of seeds)."""
    out = {}
    for variant, results in runs.items():
        out[variant] = {}
        for key, _ in ROWS:
            values = [r["metrics"][key] for r in results if r["metrics"].get(key) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out[variant][key] = (statistics.fmean(values), std, len(values))
    return out


def format_table(summary: dict, split: str) -> str:
    names = list(summary)
    lines = [f"grounding on the {split} split, mean +- std over seeds (n)",
             f"{'metric':36}" + "".join(f"{n:>24}" for n in names)]
    for key, label in ROWS:
        cells = []
        for n in names:
            m = summary[n].get(key)
            cells.append(f"{m[0]:.3f} +- {m[1]:.3f} ({m[2]})" if m else "-")
        lines.append(f"{label:36}" + "".join(f"{c:>24}" for c in cells))
    if "full" in summary and "no_region_aca" in summary:
        a, b = summary["full"], summary["no_region_aca"]
        for key, label in ROWS[:1]:
            if key in a and key in b:
                gap, spread = a[key][0] - b[key][0], max(a[key][1], b[key][1], 1e-12)
                lines.append(f"full - no_region_aca, {label}: {gap:+.3f} = {gap / spread:+.1f} std")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/ablation")
    p.add_argument("--config", default="configs/demo.yaml", help="the pretraining config of every run")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the --seeded variants")
    p.add_argument("--seeded", default="full,no_region_aca", help="variants run with every seed")
    p.add_argument("--single", default="no_aca,no_region", help="variants run with the first seed only")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run (key=value)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    plan = {v: seeds for v in args.seeded.split(",") if v}
    plan.update({v: seeds[:1] for v in args.single.split(",") if v})
    unknown = [v for v in plan if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {v: [run_one(v, s, out, args.config, args.set, args.split) for s in ss] for v, ss in plan.items()}
    summary = summarize(runs)
    print("\n" + format_table(summary, args.split))
    report = {"split": args.split, "config": args.config, "overrides": args.set,
              "variants": {v: VARIANTS[v] for v in plan}, "runs": runs, "summary": summary}
    (out / f"ablation_{args.split}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / f'ablation_{args.split}.json'}")
    return report


if __name__ == "__main__":
    main()
