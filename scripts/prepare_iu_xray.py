"""IU X-ray (OpenI NLM XML reports) -> an R2Gen annotation.json.

    python scripts/prepare_iu_xray.py --reports NLMCXR_reports.tgz [--images NLMCXR_png] \
        [--tsne-views nlmcxr_tsne_pa.csv.gz] [--dicom-views nlmcxr_dicom_metadata.csv.gz] \
        [--sections findings|findings+impression] --out data/iu_xray/annotation.json

--reports is the NLM archive (or a folder of its XML files); the view tables are the ones
torchxrayvision ships (its wheel's ``torchxrayvision/data/``). One record per report:
``report`` (the chosen sections), ``image_path`` ``<image id>.png`` (frontal first) and
``views``, ``labels`` (the project's rule labeler: IU X-ray has no label files), ``anatomies``
(the project's report parser), ``split`` (a deterministic 70/10/20 split by a hash of the report
id; one report is one patient, so it is a patient-level split). With --images, images missing
there are left out. Prints every dropped report with its reason, then the counts per split.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.annotation import DataError, write_annotation  # noqa: E402
from datasets.iu_xray import prepare, read_reports, read_views  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", required=True, help="NLMCXR_reports.tgz or a folder of XMLs")
    ap.add_argument("--images", default=None, help="NLMCXR_png folder (checks the images exist)")
    ap.add_argument("--tsne-views", default=None, help="nlmcxr_tsne_pa.csv.gz")
    ap.add_argument("--dicom-views", default=None, help="nlmcxr_dicom_metadata.csv.gz")
    ap.add_argument("--sections", choices=("findings", "findings+impression"), default="findings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        reports = read_reports(args.reports)
        views = read_views(args.tsne_views, args.dicom_views)
        records, dropped = prepare(reports, args.sections, views, args.images)
        for rid, reason in dropped:
            print(f"dropped report {rid}: {reason}")
        counts = write_annotation(args.out, records)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" studies from {len(reports)} reports (sections: {args.sections})")
    no_frontal = sum(not any(v in ("PA", "AP") for v in r["views"]) for r in records)
    print(f"{no_frontal} studies have no image of a known frontal view "
          "(data.views first_frontal skips them)")
    reasons = Counter(r for _, r in dropped)
    print(f"dropped {len(dropped)} reports" + "".join(f"\n  {n} {r}" for r, n in reasons.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
