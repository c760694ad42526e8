"""Language metrics: equal to pycocoevalcap on the same inputs; hand-computed values; the no-Java
path."""
import math
import threading
import warnings

import pytest

from metrics import nlg
from metrics.nlg import ptb_tokenize_py, score_nlg

HAS_JAVA = nlg.java_available()
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no Java runtime on PATH")

# Report-like text as MIMIC-CXR / IU X-ray / the synthetic generator write it.
REPORT_LINES = [
    "There is an opacity in the right lower lung zone. Small left pleural effusion.",
    "The heart is enlarged. No pleural effusion or pneumothorax.",
    "Pulmonary edema with perihilar haziness. Fracture of the left clavicle.",
    "A right internal jugular catheter terminates at the cavoatrial junction. The mediastinum is widened.",
    "Compared to the prior study from ___, there is no significant change.",
    "The endotracheal tube terminates 4.5 cm above the carina; NG tube in the stomach.",
    "Bibasilar opacities, left greater than right, likely reflect atelectasis, though infection cannot be excluded.",
    "Heart size is top-normal. Mediastinal and hilar contours are unremarkable.",
    "Old healed right rib fractures (5th-7th ribs). Median sternotomy wires are intact.",
    "Dual-lead pacemaker/ICD with leads in the right atrium and right ventricle, unchanged.",
    "1. No acute cardiopulmonary process. 2. Stable mild cardiomegaly.",
    "The XXXX are normal. No XXXX of pneumothorax. Heart size normal.Lungs clear.",
    "Dr. ___ was notified of the findings by telephone at 10:30 a.m. on ___.",
    "A 1.2 x 1.5 cm nodular opacity projects over the left mid lung, possibly a nipple shadow.",
    "ET tube 3 cm above the carina; right IJ central line tip in the SVC; s/p CABG.",
    "Ill-defined opacity at the right base, ? aspiration vs. pneumonia. Small effusions, L>R.",
    "The patient's lines/tubes are unchanged in position. There's no pneumothorax; it isn't new.",
    "Status post left upper lobectomy with volume loss, e.g., elevation of the left hemidiaphragm.",
    "Endotracheal tube tip is at the level of the clavicles, approx. 5 cm above the carina.",
    "Chest: 2 views. Comparison: ___. Indication: ___-year-old woman with cough, r/o pneumonia.",
    "Bilateral hilar lymphadenopathy (sarcoid?) is again noted -- unchanged since 1/2/2012.",
    "The lungs are well expanded and clear; there is no effusion, edema, or pneumothorax!",
    "“Quoted” text and ‘single’ quotes, 10-15% decrease, PA and lateral views; Chest PA.",
]

# PTBTokenizer's output on some of the lines above (pinned, so the pure-Python path is checked
# without Java).
PINNED = {
    REPORT_LINES[1]: "the heart is enlarged no pleural effusion or pneumothorax",
    REPORT_LINES[
        5
    ]: "the endotracheal tube terminates 4.5 cm above the carina ng tube in the stomach",
    REPORT_LINES[
        8
    ]: "old healed right rib fractures -lrb- 5th-7th ribs -rrb- median sternotomy wires are intact",
    REPORT_LINES[11]: "the xxxx are normal no xxxx of pneumothorax heart size normal.lungs clear",
    REPORT_LINES[12]: "dr. ___ was notified of the findings by telephone at 10:30 a.m. on ___",
    REPORT_LINES[
        16
    ]: "the patient 's lines/tubes are unchanged in position there 's no pneumothorax it is n't new",
    REPORT_LINES[
        22
    ]: "quoted text and single quotes 10-15 % decrease pa and lateral views chest pa.",
}


def _pairs():
    """id -> references, id -> [generation]: single and multiple references, an empty generation."""
    gts, res = {}, {}
    n = len(REPORT_LINES)
    for i, line in enumerate(REPORT_LINES):
        gts[f"s{i}"] = [line]
        res[f"s{i}"] = [REPORT_LINES[(i * 7 + 3) % n] + " " + REPORT_LINES[i].split(".")[0] + "."]
    gts["multi"] = [REPORT_LINES[0], REPORT_LINES[1]]
    res["multi"] = ["The heart is enlarged. Small left pleural effusion."]
    gts["empty"] = [REPORT_LINES[2]]
    res["empty"] = [""]
    return gts, res


def _pycocoevalcap(gts, res) -> dict:
    """The reference: pycocoevalcap's PTBTokenizer and scorers, used as COCOEvalCap uses them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    r = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    out = {}
    bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
    for n in range(4):
        out[f"BLEU_{n + 1}"] = bleu[n]
    out["METEOR"] = Meteor().compute_score(g, r)[0]
    out["ROUGE_L"] = Rouge().compute_score(g, r)[0]
    out["CIDEr"] = Cider().compute_score(g, r)[0]
    return out


@pytest.fixture(scope="module")
def both():
    """(ours with METEOR split over two JVMs, pycocoevalcap's) on the same inputs, computed side by
    side."""
    gts, res = _pairs()
    ref: dict = {}
    worker = threading.Thread(target=lambda: ref.update(_pycocoevalcap(gts, res)))
    worker.start()
    ours = score_nlg(gts, res, meteor_workers=2)
    worker.join()
    return ours, ref


@needs_java
def test_equal_to_pycocoevalcap(both):
    ours, ref = both
    assert set(ours) == set(nlg.METRICS)
    for m in nlg.METRICS:
        assert ours[m] is not None and abs(ours[m] - ref[m]) < 1e-4, (m, ours[m], ref[m])
    assert 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0


def test_known_values_hand_computed():
    # hyp "a b c d" vs ref "a c d e f": unigram matches 3/4, bigram 1/3, no trigram; brevity penalty
    # exp(1 - 5/4); LCS "a c d" = 3 -> P 3/4, R 3/5, ROUGE-L (beta 1.2) = 2.44 P R / (R + 1.44 P).
    out = score_nlg({"x": ["A c d e f."]}, {"x": ["a b c d"]}, use_java=False, meteor=False)
    bp = math.exp(1 - 5 / 4)
    assert out["BLEU_1"] == pytest.approx(0.75 * bp, abs=1e-6)
    assert out["BLEU_2"] == pytest.approx(bp * math.sqrt(0.75 * 1 / 3), abs=1e-6)
    assert out["BLEU_3"] < 1e-4 and out["BLEU_4"] < 1e-4
    p, r = 3 / 4, 3 / 5
    assert out["ROUGE_L"] == pytest.approx(2.44 * p * r / (r + 1.44 * p), abs=1e-9)
    assert out["METEOR"] is None
    # Perfect generations over two studies sharing no n-gram: CIDEr-D 10 (its x10 scale), BLEU 1,
    # ROUGE-L 1.
    gts = {"a": ["the heart is enlarged today"], "b": ["no pleural effusion or pneumothorax"]}
    out = score_nlg(gts, gts, use_java=False, meteor=False)
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert out["ROUGE_L"] == pytest.approx(1.0) and out["BLEU_4"] == pytest.approx(1.0, abs=1e-6)


def test_references_are_not_truncated():
    long_ref = " ".join(f"word{i} finding{i % 7}." for i in range(300))  # ~600 tokens
    out = score_nlg({"a": [long_ref], "b": ["short other text here"]},
                    {"a": [long_ref], "b": ["short other text here"]}, use_java=False, meteor=False)
    assert out["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and out["ROUGE_L"] == pytest.approx(1.0)
    half = " ".join(long_ref.split()[:300])
    cut = score_nlg({"a": [long_ref]}, {"a": [half]}, use_java=False, meteor=False)
    assert cut["BLEU_1"] < 0.7  # a truncated reference would have made this generation perfect


def test_python_tokenizer_pinned_outputs():
    for text, expected in PINNED.items():
        assert ptb_tokenize_py(text) == expected


@needs_java
def test_python_tokenizer_equals_java_ptb():
    extra = [
        "No. 5 vs. the U.S.; e.g., 3.5cm and 10:30pm, x-ray +/- effusion",
        "'90s 1 1/2 cm ... pts' isn't",
        "Cannot exclude pneumonia!! (see above) [1] {2} * ** & % $ # ## @home",
        "",
    ]
    # in sequence: the lexer looks across lines ("L>R." before "The ...")
    lines = REPORT_LINES + extra
    assert nlg.ptb_tokenize(lines, use_java=True) == nlg.ptb_tokenize(lines, use_java=False)
    assert nlg.ptb_tokenize_java(["see R.", "The next", "see R.", "the next"])[::2] == [
        "see r",
        "see r.",
    ]
    assert nlg.ptb_tokenize(["see R.", "The next", "see R.", "the next"], use_java=False)[::2] == [
        "see r",
        "see r.",
    ]


def test_no_java_path(monkeypatch, both):
    ours_java, _ = both
    gts, res = _pairs()
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="METEOR is reported as missing"):
        out = score_nlg(gts, res)
    assert out["METEOR"] is None
    if HAS_JAVA:  # the pure-Python tokenizer gives the Java path's numbers on report text
        for m in nlg.METRICS:
            if m != "METEOR":
                assert abs(out[m] - ours_java[m]) < 1e-4, m
    with pytest.raises(RuntimeError):
        score_nlg(gts, res, use_java=True)


def test_meteor_off_gives_none_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = score_nlg({"a": ["no effusion"]}, {"a": ["no effusion"]}, meteor=False)
    assert out["METEOR"] is None and out["ROUGE_L"] == pytest.approx(1.0)


def test_input_checks():
    with pytest.raises(ValueError, match="ids differ"):
        score_nlg({"a": ["x"]}, {"b": ["x"]}, use_java=False, meteor=False)
    with pytest.raises(ValueError, match="exactly one"):
        score_nlg({"a": ["x"]}, {"a": ["x", "y"]}, use_java=False, meteor=False)
    # plain strings work
    out = score_nlg({"a": "the heart"}, {"a": "the heart"}, use_java=False, meteor=False)
    assert out["ROUGE_L"] == pytest.approx(1.0)


def test_details_per_report():
    details = {}
    gts = {"a": ["the heart is enlarged"], "b": ["no effusion"]}
    res = {"a": ["the heart is enlarged"], "b": ["small effusion"]}
    score_nlg(gts, res, use_java=False, meteor=False, details=details)
    assert details["ids"] == ["a", "b"] and details["per_report"]["ROUGE_L"][0] == pytest.approx(
        1.0
    )
    assert details["tokenizer"].startswith("PTB rules")


def test_rouge_l_equals_pycocoevalcap_rouge_exactly():
    import random

    from pycocoevalcap.rouge.rouge import Rouge, my_lcs
    rnd = random.Random(0)
    words = "the heart is enlarged no pleural effusion or pneumothorax left right small".split()
    for _ in range(300):
        a = [rnd.choice(words) for _ in range(rnd.randint(0, 40))]
        b = [rnd.choice(words) for _ in range(rnd.randint(0, 40))]
        assert nlg.lcs_length(a, b) == my_lcs(a, b)
    gts = {
        str(i): [
            " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 30)))
            for _ in range(rnd.randint(1, 3))
        ]
        for i in range(50)
    }
    res = {k: [" ".join(rnd.choice(words) for _ in range(rnd.randint(0, 30)))] for k in gts}
    ours, ours_each = nlg.rouge_l(gts, res)
    ref, ref_each = Rouge().compute_score(gts, res)
    assert ours == ref and (ours_each == ref_each).all()
