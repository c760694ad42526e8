"""MIMIC-CXR (JPG tree, CSVs, free-text reports) -> an R2Gen annotation.json.

    python scripts/prepare_mimic.py --root MIMIC-CXR-JPG [--reports MIMIC-CXR-REPORTS] \
        [--sections findings|findings+impression] [--labels chexpert|negbio] \
        --out data/mimic/annotation.json

Reads ``files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg`` under --root, the report
``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` under --reports (default: --root), and
``mimic-cxr-2.0.0-{split,metadata,<labels>}.csv.gz`` (under --root unless given with --split,
--metadata, --labels-csv). Writes one record per study: ``report`` (the chosen sections),
``image_path`` (frontal first: PA, then AP, then the other views) and ``views``, ``labels`` (the
CSV's, in the project's observation order; a study without a row: the project's rule labeler),
``anatomies`` (the project's report parser), ``split``, ``subject_id``, ``study_id``. Prints
every dropped study with its reason, then the counts per split. Point ``data.annotation`` at
--out and ``data.image_root`` at --root.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.annotation import DataError, write_annotation  # noqa: E402
from datasets.mimic_cxr import prepare  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="MIMIC-CXR-JPG root (holds files/ and CSVs)")
    ap.add_argument("--reports", default=None, help="root of files/pXX/.../sNNN.txt (default --root)")
    ap.add_argument("--split", default=None, help="default ROOT/mimic-cxr-2.0.0-split.csv.gz")
    ap.add_argument("--metadata", default=None, help="default ROOT/mimic-cxr-2.0.0-metadata.csv.gz")
    ap.add_argument("--labels", choices=("chexpert", "negbio"), default="chexpert")
    ap.add_argument("--labels-csv", default=None, help="default ROOT/mimic-cxr-2.0.0-<labels>.csv.gz")
    ap.add_argument("--sections", choices=("findings", "findings+impression"), default="findings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    root = Path(args.root)
    csv_path = {
        "split": args.split or root / "mimic-cxr-2.0.0-split.csv.gz",
        "metadata": args.metadata or root / "mimic-cxr-2.0.0-metadata.csv.gz",
        "labels": args.labels_csv or root / f"mimic-cxr-2.0.0-{args.labels}.csv.gz",
    }
    try:
        records, dropped, rule_labelled = prepare(
            root, csv_path["split"], csv_path["metadata"], csv_path["labels"], args.sections,
            args.reports,
        )
        for study_id, reason in dropped:
            print(f"dropped study {study_id}: {reason}")
        counts = write_annotation(args.out, records)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" studies (sections: {args.sections}; labels: {csv_path['labels']})")
    if rule_labelled:
        print(f"{rule_labelled} studies have no row in the labels CSV: rule-labelled")
    reasons = Counter(r.split(" in ")[0].split(" (")[0] for _, r in dropped)
    print(f"dropped {len(dropped)} studies" + "".join(f"\n  {n} {r}" for r, n in reasons.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
