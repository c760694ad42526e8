"""``python -m metrics FILE.jsonl``: counts, language and clinical tables, JSON output, errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metrics import nlg
from metrics.__main__ import main
from metrics.clinical import clinical_efficacy
from metrics.reports import read_jsonl
from vocab.labeler import RuleLabeler

ROOT = Path(__file__).resolve().parent.parent
RECORDS = [
    {
        "id": "a",
        "generated": "The heart is enlarged. No pleural effusion.",
        "reference": "Cardiomegaly. No effusion.",
        "entities": ["cardiomegaly"],
        "anatomies": ["heart"],
    },
    {"id": "b", "generated": "", "reference": "Small left pleural effusion."},
    {
        "id": "c",
        "generated": "Right apical pneumothorax.",
        "reference": ["Right apical pneumothorax.", "Apical PTX."],
    },
    {
        "id": 4,
        "generated": "Possible pneumonia at the left base.",
        "reference": "Left lower lobe pneumonia.",
    },
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "generated.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return path


def test_cli_prints_counts_and_tables_and_writes_json(jsonl, tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    result = main(
        [str(jsonl), "--no-meteor", "--json", str(out_json), "--uncertain-as", "positive"]
    )
    text = capsys.readouterr().out
    assert (
        "studies: 4" in text
        and "empty generations: 1" in text
        and "references per study: 2" in text
    )
    # METEOR switched off -> n/a, not a number
    assert "BLEU_1" in text and "CIDEr" in text and "n/a" in text
    assert (
        "all 14 observations" in text
        and "example-based" in text
        and "uncertain as positive" in text
    )
    assert "time: language" in text
    saved = json.loads(out_json.read_text())
    assert saved["counts"]["studies"] == 4 and saved["language"]["METEOR"] is None
    # the same numbers as the library functions on the same inputs
    gts = {"a": ["Cardiomegaly. No effusion."], "b": ["Small left pleural effusion."],
           "c": ["Right apical pneumothorax.", "Apical PTX."], "4": ["Left lower lobe pneumonia."]}
    res = {r["id"] if isinstance(r["id"], str) else str(r["id"]): [r["generated"]] for r in RECORDS}
    direct = nlg.score_nlg(gts, res, meteor=False)
    for m in nlg.METRICS:
        assert saved["language"][m] == direct[m]
    lab = RuleLabeler()
    ce = clinical_efficacy(lab.label([r["generated"] for r in RECORDS]),
                           lab.label([g[0] for g in gts.values()]), "positive")
    assert (
        saved["clinical_efficacy"]["all"] == ce["all"]
        and result["clinical_efficacy"]["common"] == ce["common"]
    )


def test_module_entry_point_with_meteor(jsonl):
    proc = subprocess.run(
        [sys.executable, "-m", "metrics", str(jsonl)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Language (pycocoevalcap scorers" in proc.stdout and "Clinical efficacy" in proc.stdout
    values = proc.stdout.split("CIDEr")[1].splitlines()[1].split()
    assert len(values) == 7
    if nlg.java_available():
        assert values[4] != "n/a" and 0.0 <= float(values[4]) <= 1.0  # METEOR
    else:
        assert values[4] == "n/a" and "no Java" in proc.stderr


def test_bad_inputs(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"id": "x", "generated": "a", "reference": "b"}) + "\n"
                   + json.dumps({"id": "x", "generated": "c", "reference": "d"}) + "\n")
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        read_jsonl(str(dup))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "x", "generated": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing 'reference'"):
        read_jsonl(str(missing))
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"id": "x", "generated": "a", "reference": "b"}) + "\n")
    with pytest.raises(ValueError, match="checkpoint path"):
        main([str(ok), "--no-meteor", "--labeler", "chexbert"])


@pytest.mark.parametrize("line, says", [
    ({"id": "x", "generated": "a", "reference": []}, "'reference' is an empty list"),
    ({"id": "x", "generated": 3, "reference": "b"}, "'generated' must be a string"),
    ({"id": "x", "generated": "a", "reference": ["b", {"t": 1}]}, "'reference' must be a string"),
    (["a", "b"], "not a JSON object (list)"),
])
def test_malformed_fields_are_named_errors(tmp_path, capsys, line, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "generated": "a", "reference": "b"}) + "\n"
                   + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2: " + re.escape(says)):
        read_jsonl(str(bad))
    with pytest.raises(SystemExit) as e:  # the CLI: a usage error, not a traceback
        main([str(bad), "--no-meteor"])
    assert e.value.code == 2 and f"{bad}:2: {says}" in capsys.readouterr().err
