"""Score any system's generated reports: ``python -m metrics generated.jsonl [options]``.

Each line: {"id", "generated", "reference" (a string, or a list of reference strings)}; other keys
("entities", "anatomies", ...) are ignored. Prints the counts, the language metrics (pycocoevalcap's
numbers, full references) and the clinical-efficacy table (both sides labelled by the same labeler),
with timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from metrics.clinical import build_labeler, format_table
from metrics.nlg import METRICS
from metrics.reports import read_jsonl, score_records


def format_report(result: dict, path: str = "") -> str:
    c, s = result["counts"], result["seconds"]
    lines = [
        f"scored: {path}" if path else "scored",
        f"studies: {c['studies']}   empty generations: {c['empty_generations']}   "
        f"empty references: {c['empty_references']}   references per study: {c['references_per_study']}   "
        f"mean words generated/reference: {c['mean_generated_words']:.1f}/{c['mean_reference_words']:.1f}",
        "",
        f"Language (pycocoevalcap scorers; tokenizer: {result['tokenizer']}; full references)",
        "  ".join(f"{m:>8}" for m in METRICS),
    ]
    lang = result["language"]
    lines.append(
        "  ".join(f"{lang[m]:8.4f}" if lang[m] is not None else f"{'n/a':>8}" for m in METRICS)
    )
    if lang["METEOR"] is None:
        lines.append(
            "METEOR n/a: no Java runtime (install a JRE, e.g. scripts/setup_env.sh), or --no-meteor"
        )
    lines += [
        "",
        format_table(result["clinical_efficacy"], result["labeler"]),
        "",
        f"time: language {s['language']:.1f} s (METEOR {s.get('language/METEOR', 0):.1f} s, run alongside "
        f"BLEU/ROUGE-L/CIDEr), labels {s['clinical']:.1f} s (alongside), total {s['total']:.1f} s "
        f"for {c['studies']} studies",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="generated.jsonl with id / generated / reference per line")
    ap.add_argument("--labeler", choices=("rule", "chexbert"), default="rule")
    ap.add_argument(
        "--chexbert-path", default=None, help="local CheXbert checkpoint (chexbert.pth)"
    )
    ap.add_argument(
        "--chexbert-bert",
        default=None,
        help="local folder with the BERT config.json + tokenizer (default: the checkpoint's folder)",
    )
    ap.add_argument("--device", default="cpu", help="device for CheXbert, e.g. cuda:0")
    ap.add_argument("--batch-size", type=int, default=32, help="CheXbert batch size")
    ap.add_argument("--uncertain-as", choices=("negative", "positive"), default="negative")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (reported as n/a)")
    ap.add_argument(
        "--json", default=None, metavar="OUT", help="also write every number to OUT as JSON"
    )
    args = ap.parse_args(argv)
    try:
        records = read_jsonl(args.file)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labeler = build_labeler(args.labeler, args.chexbert_path, args.chexbert_bert, args.device,
                                args.batch_size)
        result = score_records(records, labeler, args.uncertain_as, meteor=not args.no_meteor)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(format_report(result, args.file))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"file": args.file, **result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
