"""How well the report parsers read real and synthetic text (metrics/report_parsing.py).

    python scripts/text_agreement.py --gold tests/helpers/iu_xray_gold.json \
        --reports .cache/wheels/torchxrayvision-1.5.7-py3-none-any.whl
    python scripts/text_agreement.py --synthetic data/synthetic/annotation.json
    python scripts/text_agreement.py --synthetic-n 1000        # studies drawn in memory

--gold: the rule labeler's micro P/R/F1 over the 14 observations and the anatomy parser's
micro P/R/F1 over leaves, on the tune half, the held-out half and all of the gold set, then per
observation and per leaf (all). --reports is NLMCXR_reports.tgz, a folder of its XMLs, or the
torchxrayvision wheel that ships it. --synthetic: the share of synthetic studies whose parsed
anatomy leaves equal the generator's, with the first disagreements.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.iu_xray import read_reports  # noqa: E402
from datasets.synthetic import render_study  # noqa: E402
from metrics.report_parsing import (  # noqa: E402
    HALVES,
    load_gold,
    score_gold,
    synthetic_agreement,
)
from vocab.anatomy_graph import AnatomyGraph  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WHEEL = REPO / ".cache" / "wheels" / "torchxrayvision-1.5.7-py3-none-any.whl"


def load_reports(path: Path):
    """IU X-ray reports from a .tgz, a folder, or a wheel holding NLMCXR_reports.tgz."""
    if path.suffix != ".whl":
        return read_reports(path)
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
        data = wheel.read("torchxrayvision/data/NLMCXR_reports.tgz")
        tarfile.open(fileobj=io.BytesIO(data)).close()         # fail early on a bad archive
        tgz = Path(tmp) / "NLMCXR_reports.tgz"
        tgz.write_bytes(data)
        return read_reports(tgz)


def fmt(p_r_f) -> str:
    return f"P {p_r_f[0]:.3f}  R {p_r_f[1]:.3f}  F1 {p_r_f[2]:.3f}"


def report_gold(gold_path: Path, reports_path: Path, graph) -> dict:
    gold = load_gold(gold_path, graph)
    reports = load_reports(reports_path)
    scores = {h: score_gold(gold, reports, graph, h) for h in (*HALVES, "all")}
    for half, s in scores.items():
        print(f"{half:9s} n={s['n']:3d}  labels micro {fmt(s['labels']['micro'])}   "
              f"anatomy micro {fmt(s['anatomies']['micro'])}")
    print(f"\n{'observation (all)':28s} {'P':>6s} {'R':>6s} {'F1':>6s} {'gold':>5s}")
    for obs, (p, r, f, n) in scores["all"]["labels"]["per"].items():
        print(f"{obs:28s} {p:6.3f} {r:6.3f} {f:6.3f} {n:5d}")
    print(f"\n{'anatomy leaf (all)':28s} {'P':>6s} {'R':>6s} {'F1':>6s} {'gold':>5s}")
    for leaf, (p, r, f, n) in scores["all"]["anatomies"]["per"].items():
        print(f"{leaf:28s} {p:6.3f} {r:6.3f} {f:6.3f} {n:5d}")
    return scores


def report_synthetic(records: list[dict], graph, show: int = 5) -> float:
    agree, wrong = synthetic_agreement(records, graph)
    share = agree / len(records) if records else 0.0
    print(f"synthetic: parsed anatomies equal the generator's on {agree} of {len(records)} "
          f"studies ({100 * share:.1f}%)")
    for w in wrong[:show]:
        print(f"  {w['id']}: true {w['true']} parsed {w['parsed']}\n    {w['report']}")
    return share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gold", type=Path, default=None)
    ap.add_argument("--reports", type=Path, default=WHEEL)
    ap.add_argument("--synthetic", type=Path, default=None, help="a synthetic annotation.json")
    ap.add_argument("--synthetic-n", type=int, default=0, help="draw N studies in memory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    graph = AnatomyGraph.default()
    if not (args.gold or args.synthetic or args.synthetic_n):
        ap.error("give --gold, --synthetic or --synthetic-n")
    if args.gold:
        report_gold(args.gold, args.reports, graph)
    if args.synthetic:
        data = json.loads(args.synthetic.read_text())
        report_synthetic([r for sp in data.values() for r in sp], graph)
    if args.synthetic_n:
        records = []
        for i in range(args.synthetic_n):
            st = render_study(i, size=32, seed=args.seed)
            records.append({"id": f"syn{i:06d}", "report": st["report"],
                            "anatomies": st["anatomies"]})
        report_synthetic(records, graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
