"""The table of scripts/downstream.sh: each downstream figure of the SS-ACL checkpoint beside random
init (mean +- std over seeds for fine-tuning), against the suite's targets.

    python scripts/downstream_summary.py --out output/downstream --seeds "0 1 2"

Reads OUT/<run>_s<seed>/eval_test/metrics.json (main_finetune.py --eval) and
OUT/zeroshot/zeroshot_test[_random_init]/metrics.json (main_zeroshot.py); writes OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run scripts/downstream.sh first)")
    return json.loads(path.read_text())


def finetuned(out: Path, run: str, init: str, seeds: list[str], key: str) -> tuple[float, float]:
    """(mean, std) over seeds of the test metric ``key`` of runs <run>_<init>_s<seed>."""
    values = [_read(out / f"{run}_{init}_s{s}" / "eval_test" / "metrics.json")["metrics"][key]
              for s in seeds]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_rows(out: Path, seeds: list[str]) -> list[dict]:
    """[{task, metric, ssacl, baseline, target, met}]; ssacl / baseline are (mean, std)."""
    rows = []

    def add(task, metric, ours, base, target, met):
        rows.append({"task": task, "metric": metric, "ssacl": ours, "baseline": base,
                     "target": target, "met": bool(met)})

    for run, task, key, margin in (("cls1", "NIH-like, 1% labels, full fine-tuning", "auroc", 0.10),
                                   ("seg10", "SIIM-like, 10% labels, segmentation", "dice", 0.05)):
        ours, base = (finetuned(out, run, i, seeds, key) for i in ("ssacl", "random"))
        add(task, key, ours, base, f">= random init + {margin:.2f}", ours[0] >= base[0] + margin)
    ours, base = (finetuned(out, "probe", i, seeds, "auroc") for i in ("ssacl", "random"))
    add("NIH-like, linear probe (all labels)", "auroc", ours, base, ">= 0.80", ours[0] >= 0.80)

    zs = _read(out / "zeroshot" / "zeroshot_test" / "metrics.json")
    zr = _read(out / "zeroshot" / "zeroshot_test_random_init" / "metrics.json")
    def one(d, k):  # a single evaluation: no spread
        return d[k], 0.0

    for task in ("nih", "rsna", "chexpert5x200"):
        k = f"classification/{task}/auroc_macro"
        add(f"zero-shot classification, {task}-like", "auroc", one(zs, k), one(zr, k), ">= 0.80",
            zs[k] >= 0.80)
    for direction in ("i2t", "t2i"):
        k = f"retrieval/chexpert5x200/{direction}/P@1"
        add(f"5x200-like retrieval, {direction}", "P@1 (chance 0.2)", one(zs, k), one(zr, k),
            ">= 0.60", zs[k] >= 0.60)
    for metric in ("miou", "cnr", "pointing_game"):
        text = zs[f"grounding/mscxr/text/{metric}"]
        others = {"official CLS": zs.get(f"grounding/mscxr/cls/{metric}"),
                  "location prior": zs.get(f"grounding/mscxr/prior/{metric}"),
                  "random init": zr[f"grounding/mscxr/text/{metric}"]}
        for name, value in others.items():
            if value is None:
                continue
            need = metric != "pointing_game"
            add(f"MS-CXR-like grounding: text-prompted vs {name}", metric, (text, 0.0), (value, 0.0),
                "> baseline" if need else "(reported)", text > value if need else True)
    return rows


def format_table(rows: list[dict], seeds: list[str]) -> str:
    def cell(m):
        return f"{m[0]:.3f} +- {m[1]:.3f}" if m[1] else f"{m[0]:.3f}"

    lines = [f"test split; fine-tuning: mean +- std over seeds {', '.join(seeds)}",
             "| task | metric | SS-ACL | baseline | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {cell(r['ssacl'])} | {cell(r['baseline'])} "
                     f"| {r['target']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/downstream")
    p.add_argument("--seeds", default="0 1 2")
    args = p.parse_args(argv)
    out, seeds = Path(args.out), args.seeds.replace(",", " ").split()
    rows = build_rows(out, seeds)
    print(format_table(rows, seeds))
    (out / "summary.json").write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return rows


if __name__ == "__main__":
    main()
