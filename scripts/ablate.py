"""Does the method matter? The demo pipeline with and without region reconstruction + anatomical
consistency alignment (loss.region.weight = 0, loss.aca.weight = 0), same data, budget and seed.

    python scripts/ablate.py                                  # trains both variants (2 x the demo's time)
    python scripts/ablate.py --reuse-full output/demo_report  # reuse the demo run as the full variant
    python scripts/ablate.py --reuse-full output/demo_report --variants no_region_aca,no_location_prior

Each variant runs main_pretrain.py (configs/demo.yaml), main_report.py fine-tuning
(configs/demo_report.yaml, from that variant's pretraining checkpoint) and main_report.py --eval on
the test split, as subprocesses under OUT/<variant>_{pretrain,report}; its overrides apply to both
training stages (both are 0 in fine-tuning anyway). Then the models' grounding
and clinical / language figures are printed side by side and written to OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "full": [],
    "no_region_aca": ["loss.region.weight=0", "loss.aca.weight=0"],
    # a learned spatial prior instead of the report-derived one
    "no_location_prior": [
        "model.location_prior.enabled=false",
        "loss.rest.weight=0",
        "model.spatial_prior=true",
    ],
}
ROWS = [("pointing_game", "pointing game (all leaves)"),
        ("pointing_game_tol15", "pointing game, 15 px @224 tolerance"),
        ("pointing_game_findings", "pointing game (finding leaves)"),
        ("cnr", "finding CNR (signed)"),
        ("ce_micro_f1_14", "clinical micro-F1 (14)"), ("ce_macro_f1_14", "clinical macro-F1 (14)"),
        ("ce_micro_f1_5", "clinical micro-F1 (5)"), ("BLEU_1", "BLEU-1"), ("BLEU_4", "BLEU-4"),
        ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr")]


def _run(args: list[str]) -> float:
    cmd = [sys.executable] + args
    print("[ablate] $ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=str(ROOT))
    return time.time() - t0


def run_variant(name: str, out: Path, pre_cfg: str, rep_cfg: str, sets: list[str]) -> dict:
    """Pretrain, fine-tune and evaluate one variant; returns its test metrics and stage timings."""
    extra = VARIANTS[name]
    pre_dir, rep_dir = out / f"{name}_pretrain", out / f"{name}_report"
    common = [f"output_dir={out}"] + list(sets)
    times = {"pretrain_s": _run(["main_pretrain.py", "--config", pre_cfg, "--set", *common, *extra,
                                 f"run_name={pre_dir.name}"])}
    ckpt = pre_dir / "checkpoint-best.pth"
    times["finetune_s"] = _run(["main_report.py", "--config", rep_cfg, "--set", *common, *extra,
                                f"run_name={rep_dir.name}", f"train.pretrained={ckpt}"])
    times["eval_s"] = _run(
        [
            "main_report.py",
            "--config",
            rep_cfg,
            "--eval",
            "--checkpoint",
            str(rep_dir / "checkpoint-best.pth"),
            "--set",
            *common,
            f"run_name={rep_dir.name}",
        ]
    )
    return {"metrics": _metrics(rep_dir), "times": times, "overrides": extra}


def _metrics(report_dir: Path) -> dict:
    return json.loads((Path(report_dir) / "eval_test" / "metrics.json").read_text())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_table(results: dict) -> str:
    """One column per variant; with two, also their difference."""
    names = list(results)
    cols = names + (["difference"] if len(names) == 2 else [])
    widths = [max(12, len(n) + 2) for n in cols]
    lines = [
        f"{'metric':36}" + "".join(f"{n:>{w}}" for n, w in zip(cols, widths)),
        "-" * (36 + sum(widths)),
    ]
    for key, label in ROWS:
        vals = [results[n]["metrics"].get(key) for n in names]
        if len(names) == 2:
            vals.append(vals[0] - vals[1] if None not in vals else None)
        lines.append(f"{label:36}" + "".join(f"{_fmt(v):>{w}}" for v, w in zip(vals, widths)))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="output/ablation", help="folder for both variants' runs and ablation.json"
    )
    p.add_argument("--pretrain-config", default="configs/demo.yaml")
    p.add_argument("--report-config", default="configs/demo_report.yaml")
    p.add_argument(
        "--reuse-full",
        default=None,
        metavar="REPORT_RUN_DIR",
        help="use this finished fine-tuning run (with eval_test/metrics.json) as the full variant",
    )
    p.add_argument(
        "--variants",
        default="no_region_aca",
        help=f"comma-separated variants compared with the full model (of {', '.join(list(VARIANTS)[1:])})",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="overrides for every stage of every variant (key=value)",
    )
    args = p.parse_args(argv)
    names = ["full"] + [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        if name == "full" and args.reuse_full:
            results[name] = {
                "metrics": _metrics(args.reuse_full),
                "reused": str(args.reuse_full),
                "overrides": [],
            }
            continue
        results[name] = run_variant(name, out, args.pretrain_config, args.report_config, args.set)
    print("\nAblation on the synthetic test split (same data, budget, seed); "
          + "; ".join(f"{n}: {' '.join(VARIANTS[n])}" for n in names[1:]))
    print(format_table(results))
    report = {
        "variants": results,
        "pretrain_config": args.pretrain_config,
        "report_config": args.report_config,
        "overrides": args.set,
    }
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'ablation.json'}")
    return report


if __name__ == "__main__":
    main()
