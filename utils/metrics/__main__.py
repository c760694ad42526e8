"""Score any system's generated reports: ``python -m utils.metrics generated.jsonl [options]``.

Each line: {"id", "generated", "reference" (a string, or a list of reference strings)}; other keys
("entities", "anatomies", ...) are ignored. Prints the counts, the language metrics (pycocoevalcap's numbers,
full references) and the clinical-efficacy table (both sides labelled by the same labeler), with timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings

from .clinical import build_labeler, clinical_efficacy, format_table
from .nlg import METRICS, score_nlg


def read_jsonl(path: str) -> list[dict]:
    """Records with str "id", "generated" and "references" (list); raises on malformed lines or duplicate ids."""
    records, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            for key in ("generated", "reference"):
                if key not in rec:
                    raise ValueError(f"{path}:{n}: missing {key!r}")
            rid = str(rec.get("id", n))
            if rid in seen:
                raise ValueError(f"{path}:{n}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = n
            refs = rec["reference"] if isinstance(rec["reference"], list) else [rec["reference"]]
            records.append({"id": rid, "generated": rec["generated"] or "", "references": [r or "" for r in refs]})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def score_records(records: list[dict], labeler: str = "rule", chexbert_path: str | None = None,
                  chexbert_bert: str | None = None, device: str = "cpu", batch_size: int = 32,
                  uncertain_as: str = "negative", meteor: bool = True, use_java: bool | None = None) -> dict:
    """Counts, language metrics and clinical efficacy of records from :func:`read_jsonl`."""
    t0 = time.perf_counter()
    words = lambda t: len(t.split())  # noqa: E731
    counts = {"studies": len(records),
              "empty_generations": sum(not r["generated"].strip() for r in records),
              "empty_references": sum(not any(x.strip() for x in r["references"]) for r in records),
              "references_per_study": max(len(r["references"]) for r in records),
              "mean_generated_words": sum(words(r["generated"]) for r in records) / len(records),
              "mean_reference_words": sum(words(r["references"][0]) for r in records) / len(records)}
    lab = build_labeler(labeler, chexbert_path, chexbert_bert, device, batch_size)
    labels: dict = {}

    def label_both():  # runs while the METEOR JVM works: labels of the generations and the first references
        t = time.perf_counter()
        try:
            labels["pred"] = lab.label([r["generated"] for r in records])
            labels["ref"] = lab.label([r["references"][0] for r in records])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            labels["error"] = e
        labels["seconds"] = time.perf_counter() - t

    worker = threading.Thread(target=label_both, daemon=True)
    worker.start()
    details: dict = {}
    language = score_nlg({r["id"]: r["references"] for r in records}, {r["id"]: [r["generated"]] for r in records},
                         meteor=meteor, use_java=use_java, details=details)
    t1 = time.perf_counter()
    worker.join()
    if "error" in labels:
        raise labels["error"]
    ce = clinical_efficacy(labels["pred"], labels["ref"], uncertain_as)
    t2 = time.perf_counter()
    return {"counts": counts, "language": language, "tokenizer": details["tokenizer"], "labeler": labeler,
            "clinical_efficacy": ce,
            "seconds": {"language": t1 - t0, **{f"language/{k}": v for k, v in details["seconds"].items()},
                        "clinical": labels["seconds"], "total": t2 - t0}}


def format_report(result: dict, path: str = "") -> str:
    c, s = result["counts"], result["seconds"]
    lines = [f"scored: {path}" if path else "scored",
             f"studies: {c['studies']}   empty generations: {c['empty_generations']}   "
             f"empty references: {c['empty_references']}   references per study: {c['references_per_study']}   "
             f"mean words generated/reference: {c['mean_generated_words']:.1f}/{c['mean_reference_words']:.1f}",
             "", f"Language (pycocoevalcap scorers; tokenizer: {result['tokenizer']}; full references)",
             "  ".join(f"{m:>8}" for m in METRICS)]
    lang = result["language"]
    lines.append("  ".join(f"{lang[m]:8.4f}" if lang[m] is not None else f"{'n/a':>8}" for m in METRICS))
    if lang["METEOR"] is None:
        lines.append("METEOR n/a: no Java runtime (install a JRE, e.g. scripts/setup_env.sh), or --no-meteor")
    lines += ["", format_table(result["clinical_efficacy"], result["labeler"]), "",
              f"time: language {s['language']:.1f} s (METEOR {s.get('language/METEOR', 0):.1f} s, run alongside "
              f"BLEU/ROUGE-L/CIDEr), labels {s['clinical']:.1f} s (alongside), total {s['total']:.1f} s "
              f"for {c['studies']} studies"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m utils.metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="generated.jsonl with id / generated / reference per line")
    ap.add_argument("--labeler", choices=("rule", "chexbert"), default="rule")
    ap.add_argument("--chexbert-path", default=None, help="local CheXbert checkpoint (chexbert.pth)")
    ap.add_argument("--chexbert-bert", default=None,
                    help="local folder with the BERT config.json + tokenizer (default: the checkpoint's folder)")
    ap.add_argument("--device", default="cpu", help="device for CheXbert, e.g. cuda:0")
    ap.add_argument("--batch-size", type=int, default=32, help="CheXbert batch size")
    ap.add_argument("--uncertain-as", choices=("negative", "positive"), default="negative")
    ap.add_argument("--no-meteor", action="store_true", help="skip METEOR (reported as n/a)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every number to OUT as JSON")
    args = ap.parse_args(argv)
    records = read_jsonl(args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score_records(records, args.labeler, args.chexbert_path, args.chexbert_bert, args.device,
                               args.batch_size, args.uncertain_as, meteor=not args.no_meteor)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(format_report(result, args.file))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"file": args.file, **result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
