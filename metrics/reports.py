"""Scores of generated reports against their references: language metrics (pycocoevalcap's numbers,
full references) and clinical efficacy (both sides labelled by the same labeler), with counts and
timings."""

from __future__ import annotations

import json
import threading
import time

from metrics.clinical import ce_summary, clinical_efficacy
from metrics.nlg import score_nlg


def read_jsonl(path: str) -> list[dict]:
    """Records with str "id", "generated" and "references" (a non-empty list; null counts as "");
    raises ValueError naming the file, line and field on malformed lines or duplicate ids."""
    records, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: not a JSON object ({type(rec).__name__})")
            for key in ("generated", "reference"):
                if key not in rec:
                    raise ValueError(f"{path}:{n}: missing {key!r}")
            rid = str(rec.get("id", n))
            if rid in seen:
                raise ValueError(f"{path}:{n}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = n
            refs = rec["reference"] if isinstance(rec["reference"], list) else [rec["reference"]]
            if not refs:
                raise ValueError(f"{path}:{n}: 'reference' is an empty list (give at least one)")
            for key, values in (("generated", [rec["generated"]]), ("reference", refs)):
                bad = [v for v in values if v is not None and not isinstance(v, str)]
                if bad:
                    raise ValueError(f"{path}:{n}: {key!r} must be a string (or a list of strings "
                                     f"for 'reference'), got {type(bad[0]).__name__} {bad[0]!r}")
            records.append(
                {
                    "id": rid,
                    "generated": rec["generated"] or "",
                    "references": [r or "" for r in refs],
                }
            )
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def score_records(records: list[dict], labeler, uncertain_as: str = "negative", meteor: bool = True,
                  use_java: bool | None = None) -> dict:
    """Counts, language metrics and clinical efficacy of records {"id", "generated", "references"}
    (:func:`read_jsonl`); ``labeler`` labels the generated and the first reference reports alike."""
    t0 = time.perf_counter()
    words = lambda t: len(t.split())  # noqa: E731
    counts = {
        "studies": len(records),
        "empty_generations": sum(not r["generated"].strip() for r in records),
        "empty_references": sum(not any(x.strip() for x in r["references"]) for r in records),
        "references_per_study": max(len(r["references"]) for r in records),
        "mean_generated_words": sum(words(r["generated"]) for r in records) / len(records),
        "mean_reference_words": sum(words(r["references"][0]) for r in records) / len(records),
    }
    labels: dict = {}

    # runs while the METEOR JVM works: labels of the generations and the first references
    def label_both():
        t = time.perf_counter()
        try:
            labels["pred"] = labeler.label([r["generated"] for r in records])
            labels["ref"] = labeler.label([r["references"][0] for r in records])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            labels["error"] = e
        labels["seconds"] = time.perf_counter() - t

    worker = threading.Thread(target=label_both, daemon=True)
    worker.start()
    details: dict = {}
    language = score_nlg(
        {r["id"]: r["references"] for r in records},
        {r["id"]: [r["generated"]] for r in records},
        meteor=meteor,
        use_java=use_java,
        details=details,
    )
    t1 = time.perf_counter()
    worker.join()
    if "error" in labels:
        raise labels["error"]
    ce = clinical_efficacy(labels["pred"], labels["ref"], uncertain_as)
    t2 = time.perf_counter()
    return {
        "counts": counts,
        "language": language,
        "tokenizer": details["tokenizer"],
        "labeler": labeler.name,
        "clinical_efficacy": ce,
        "seconds": {
            "language": t1 - t0,
            **{f"language/{k}": v for k, v in details["seconds"].items()},
            "clinical": labels["seconds"],
            "total": t2 - t0,
        },
    }


def flat_scores(result: dict) -> dict[str, float]:
    """Language metrics and the clinical-efficacy summary of :func:`score_records` as one flat
    dict."""
    return {**result["language"], **ce_summary(result["clinical_efficacy"])}
