"""Clinical efficacy: the rule labeler (each observation positive / negated / uncertain), the CheXbert labeler
(tiny random checkpoint), and P/R/F1 in every flavour against hand-computed values and sklearn."""
import math

import numpy as np
import pytest
import torch

from utils.metrics.clinical import (RuleLabeler, binarize, build_labeler, ce_summary, clinical_efficacy,
                                    format_table)
from utils.metrics.observations import CHEXPERT_OBSERVATIONS, COMMON_OBSERVATIONS, OBSERVATION_INDEX

NAN = math.nan
POS, NEG, UNC = 1.0, 0.0, -1.0

# observation -> (positive, negated, uncertain) sentences
CASES = {
    "Enlarged Cardiomediastinum": ("The mediastinum is widened.", "The mediastinum is not widened.",
                                   "Possible mediastinal widening."),
    "Cardiomegaly": ("The heart is enlarged.", "No cardiomegaly.", "Mild cardiomegaly cannot be excluded."),
    "Lung Opacity": ("There is an opacity in the right lower lung zone.", "No focal opacity is seen.",
                     "Possible opacity at the left base."),
    "Lung Lesion": ("A nodule in the left mid lung zone.", "No nodules or masses.",
                    "Questionable nodule in the right upper lobe."),
    "Edema": ("Pulmonary edema.", "There is no pulmonary edema.", "Mild edema may be present."),
    "Consolidation": ("Consolidation in the left lower lobe.", "Free of focal consolidation.",
                      "Consolidation cannot be excluded."),
    "Pneumonia": ("Right lower lobe pneumonia.", "No evidence of pneumonia.", "Findings may represent pneumonia."),
    "Atelectasis": ("Linear atelectasis at the right base.", "The atelectasis has resolved.",
                    "Likely atelectasis at the left base."),
    "Pneumothorax": ("Right apical pneumothorax.", "No pleural effusion or pneumothorax.",
                     "Questionable small apical pneumothorax."),
    "Pleural Effusion": ("Small left pleural effusion.", "No pleural effusion or pneumothorax.",
                         "Possible small left pleural effusion."),
    "Pleural Other": ("Right apical pleural thickening.", "No pleural thickening.",
                      "Pleural thickening versus small effusion."),
    "Fracture": ("Fracture of the left clavicle.", "No acute fracture.", "Possible nondisplaced rib fracture."),
    "Support Devices": ("A right internal jugular catheter terminates at the cavoatrial junction.",
                        "The chest tube has been removed.", "Possible retained catheter fragment."),
}
PARAMS = [(obs, want, text) for obs, texts in CASES.items() for want, text in zip((POS, NEG, UNC), texts)]

# The synthetic generator's phrasing -> every observation the sentence mentions (the rest must be nan,
# except No Finding, checked separately).
SYNTHETIC = {
    "There is an opacity in the right lower lung zone.": {"Lung Opacity": POS},
    "Small left pleural effusion.": {"Pleural Effusion": POS},
    "The heart is enlarged.": {"Cardiomegaly": POS},
    "No pleural effusion or pneumothorax.": {"Pleural Effusion": NEG, "Pneumothorax": NEG},
    "Right apical pneumothorax.": {"Pneumothorax": POS},
    "A nodule in the left mid lung zone.": {"Lung Lesion": POS},
    "Linear atelectasis at the right base.": {"Atelectasis": POS},
    "Pulmonary edema with perihilar haziness.": {"Edema": POS, "Lung Opacity": POS},
    "Fracture of the left clavicle.": {"Fracture": POS},
    "A right internal jugular catheter terminates at the cavoatrial junction.": {"Support Devices": POS},
    "The mediastinum is widened.": {"Enlarged Cardiomediastinum": POS},
    "Consolidation in the left lower lobe.": {"Consolidation": POS},
    "Heart size is normal. The lungs are clear.": {"Cardiomegaly": NEG, "Lung Opacity": NEG},
    "Enlarged cardiac silhouette.": {"Cardiomegaly": POS},
    "Enlarged cardiomediastinal silhouette.": {"Enlarged Cardiomediastinum": POS},
    "There is widening of the upper mediastinum.": {"Enlarged Cardiomediastinum": POS},
    "Left lower lobe atelectatic changes.": {"Atelectasis": POS},
    "Bilateral infiltrates and hazy opacification.": {"Lung Opacity": POS},
    "Mild pulmonary vascular congestion.": {"Edema": POS},
    "Mild pleural fibrosis.": {"Pleural Other": POS},
    "The NG tube and PICC line are in place; pacemaker leads are intact.": {"Support Devices": POS},
}

REPORTS = list(SYNTHETIC) + [t for texts in CASES.values() for t in texts] + [
    "Compared to the prior study from ___, there is no significant change.",
    "Bibasilar opacities likely reflect atelectasis, though infection cannot be excluded.",
    "No change in the large left pleural effusion. Partially resolved right effusion.",
    "Heart size and mediastinal contours are within normal limits. Lungs: clear.",
    "There is no pneumothorax or pleural effusion, and the heart is enlarged.",
    "Ill-defined opacity at the right base, ? aspiration vs. pneumonia.",
    "No focal consolidation to suggest pneumonia. Pneumonia? ? edema",
]


def _vec(text):
    return RuleLabeler().label([text])[0]


@pytest.mark.parametrize("obs,want,text", PARAMS, ids=[f"{o}-{w:g}" for o, w, _ in PARAMS])
def test_each_observation_positive_negated_uncertain(obs, want, text):
    assert _vec(text)[OBSERVATION_INDEX[obs]] == want


def test_synthetic_generator_phrasing():
    lab = RuleLabeler()
    out = lab.label(list(SYNTHETIC))
    assert out.shape == (len(SYNTHETIC), 14) and out.dtype == np.float64
    for row, (text, want) in zip(out, SYNTHETIC.items()):
        for i, obs in enumerate(CHEXPERT_OBSERVATIONS[:-1]):
            expected = want.get(obs, NAN)
            assert (math.isnan(row[i]) and math.isnan(expected)) or row[i] == expected, (text, obs, row[i])


def test_no_finding_rule():
    nf = OBSERVATION_INDEX["No Finding"]
    assert _vec("No acute cardiopulmonary process.")[nf] == POS
    assert _vec("")[nf] == POS  # nothing positive or uncertain
    assert _vec("No pleural effusion. Right PICC line in the SVC.")[nf] == POS  # support devices do not count
    assert math.isnan(_vec("Small left pleural effusion.")[nf])  # CheXpert: nan (blank), never 0
    assert math.isnan(_vec("Possible pneumonia.")[nf])  # uncertain counts as a finding


def test_scope_breakers_pseudo_negation_and_aggregation():
    v = _vec("No pleural effusion, but there is a small pneumothorax.")
    assert v[OBSERVATION_INDEX["Pleural Effusion"]] == NEG and v[OBSERVATION_INDEX["Pneumothorax"]] == POS
    v = _vec("There is no pneumothorax or pleural effusion, and the heart is enlarged.")
    assert v[OBSERVATION_INDEX["Cardiomegaly"]] == POS and v[OBSERVATION_INDEX["Pneumothorax"]] == NEG
    assert _vec("No change in the large left pleural effusion.")[OBSERVATION_INDEX["Pleural Effusion"]] == POS
    assert _vec("The pneumothorax is no longer seen.")[OBSERVATION_INDEX["Pneumothorax"]] == NEG
    assert _vec("Pleural effusions have resolved.")[OBSERVATION_INDEX["Pleural Effusion"]] == NEG
    assert _vec("Heart size is normal.")[OBSERVATION_INDEX["Cardiomegaly"]] == NEG
    assert _vec("Normal heart size.")[OBSERVATION_INDEX["Cardiomegaly"]] == NEG
    assert _vec("? pneumonia")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("Pneumonia?")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("Cannot exclude pneumonia.")[OBSERVATION_INDEX["Pneumonia"]] == UNC
    assert _vec("No findings to suggest pneumonia.")[OBSERVATION_INDEX["Pneumonia"]] == NEG
    # sentence scope: a negation does not cross a sentence; mentions aggregate positive > uncertain > negative
    v = _vec("No pleural effusion. Small left pleural effusion. Possible pneumonia. No pneumonia.")
    assert v[OBSERVATION_INDEX["Pleural Effusion"]] == POS and v[OBSERVATION_INDEX["Pneumonia"]] == UNC
    # "versus" binds its neighbours only
    v = _vec("Increased retrocardiac opacity, atelectasis vs consolidation.")
    assert v[OBSERVATION_INDEX["Lung Opacity"]] == POS
    assert v[OBSERVATION_INDEX["Atelectasis"]] == UNC and v[OBSERVATION_INDEX["Consolidation"]] == UNC


def test_trigger_prefilter_never_drops_a_mention():
    fast, full = RuleLabeler(), RuleLabeler()
    full._mentions = [(i, ("",), p, n) for i, _, p, n in full._mentions]  # "" is in every clause
    a, b = fast.label(REPORTS), full.label(REPORTS)
    assert np.array_equal(a, b, equal_nan=True)
    assert np.array_equal(fast.label(REPORTS), a, equal_nan=True)  # the sentence cache changes nothing


def test_binarize():
    x = np.array([[1, 0, -1, NAN]])
    assert binarize(x).tolist() == [[1, 0, 0, 0]]
    assert binarize(x, "positive").tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError):
        binarize(x, "ignore")


def _labels(rows):
    out = np.full((len(rows), 14), NAN)
    for r, d in enumerate(rows):
        for obs, v in d.items():
            out[r, OBSERVATION_INDEX[obs]] = v
    return out


REF = _labels([{"Cardiomegaly": 1, "Edema": 1}, {"Pleural Effusion": 1, "Atelectasis": -1}, {"No Finding": 1}])
PRED = _labels([{"Cardiomegaly": 1, "Pleural Effusion": 1}, {"Pleural Effusion": 1, "Atelectasis": 1},
                {"Edema": -1, "No Finding": 1}])


def test_clinical_efficacy_hand_computed():
    ce = clinical_efficacy(PRED, REF)
    a, c = ce["all"], ce["common"]
    # all 14: TP 3 (CM s0, PE s1, NF s2), FP 2 (PE s0, AT s1), FN 1 (ED s0)
    assert a["micro"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 6 / 9})
    # per class F1: CM 1, NF 1, PE 2/3 (P 1/2, R 1), everything else 0 -> mean over 14
    assert a["macro"] == pytest.approx({"precision": 2.5 / 14, "recall": 3 / 14, "f1": (8 / 3) / 14})
    # per study: s0 P R F 1/2; s1 P 1/2 R 1 F 2/3; s2 all 1
    assert a["example"] == pytest.approx({"precision": 2 / 3, "recall": 2.5 / 3, "f1": (0.5 + 2 / 3 + 1) / 3})
    # the 5 common: TP 2, FP 2, FN 1; s2 has nothing among them -> 0 (zero_division=0)
    assert c["micro"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert c["macro"] == pytest.approx({"precision": 1.5 / 5, "recall": 2 / 5, "f1": 1 / 3})
    assert c["example"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": (0.5 + 2 / 3) / 3})
    pe = ce["per_observation"]["Pleural Effusion"]
    assert (pe["support"], pe["predicted"], pe["tp"]) == (1, 2, 1) and pe["f1"] == pytest.approx(2 / 3)
    # uncertain counted as positive: AT s1 becomes a TP, ED s2 a FP
    pos = clinical_efficacy(PRED, REF, uncertain_as="positive")
    assert pos["all"]["micro"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 5, "f1": 8 / 11})
    flat = ce_summary(ce)
    assert flat["ce_micro_f1_14"] == pytest.approx(6 / 9) and flat["ce_macro_precision_5"] == pytest.approx(0.3)
    assert len(flat) == 18


@pytest.mark.parametrize("uncertain_as", ["negative", "positive"])
def test_clinical_efficacy_equals_sklearn(uncertain_as):
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(0)
    vals = np.array([1.0, 0.0, -1.0, NAN])
    pred = vals[rng.integers(0, 4, (60, 14))]
    ref = vals[rng.choice(4, (60, 14), p=[0.15, 0.3, 0.05, 0.5])]
    ref[:, 3] = NAN  # an observation never positive in the references
    pred[:5] = NAN  # studies predicting nothing
    ce = clinical_efficacy(pred, ref, uncertain_as)
    cols = [OBSERVATION_INDEX[o] for o in COMMON_OBSERVATIONS]
    for group, sl in (("all", slice(None)), ("common", cols)):
        p, r = binarize(pred, uncertain_as)[:, sl], binarize(ref, uncertain_as)[:, sl]
        for flavour, avg in (("micro", "micro"), ("macro", "macro"), ("example", "samples")):
            sp, sr, sf, _ = precision_recall_fscore_support(r, p, average=avg, zero_division=0)
            got = ce[group][flavour]
            assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((sp, sr, sf), abs=1e-12)


def test_format_table_side_by_side():
    text = format_table(clinical_efficacy(PRED, REF), "rule")
    assert "all 14 observations" in text and "5 common observations" in text
    for row in ("micro", "macro", "example-based"):
        assert any(line.startswith(row) for line in text.splitlines())
    assert "0.6000   0.7500   0.6667" in text  # micro over 14
    assert "Pleural Effusion*" in text


# ---- CheXbert ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chexbert_dir(tmp_path_factory):
    """A tiny random CheXbert checkpoint in the published layout + a WordPiece tokenizer, saved locally."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, PreTrainedTokenizerFast

    from utils.metrics.chexbert import CheXbertModel
    d = tmp_path_factory.mktemp("chexbert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(REPORTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    ids = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ids)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(d)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    config.save_pretrained(d)
    torch.manual_seed(0)
    model = CheXbertModel(config)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # nn.DataParallel naming, as released
    torch.save({"epoch": 3, "model_state_dict": state}, d / "chexbert.pth")
    return d


def test_chexbert_loads_and_labels(chexbert_dir):
    from utils.metrics.chexbert import CheXbertLabeler
    lab = CheXbertLabeler(str(chexbert_dir / "chexbert.pth"), device="cpu", batch_size=3)
    texts = REPORTS[:7] + ["", "word " * 200]  # an empty report, one longer than max_position_embeddings
    out = lab.label(texts)
    assert out.shape == (len(texts), 14)
    assert set(np.unique(out[~np.isnan(out)])) <= {1.0, 0.0, -1.0}
    assert set(np.unique(out[~np.isnan(out[:, 13]), 13])) <= {1.0}  # No Finding: blank or positive
    single = CheXbertLabeler(str(chexbert_dir / "chexbert.pth"), bert_dir=str(chexbert_dir), batch_size=1)
    assert np.array_equal(single.label(texts), out, equal_nan=True)  # padding does not change a report's labels
    enc = lab.tokenizer(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = lab.model(enc["input_ids"], enc["attention_mask"])[0]
        alone = lab.model(**{k: v for k, v in lab.tokenizer(texts[2:3], return_tensors="pt").items()
                             if k in ("input_ids", "attention_mask")})[0]
    assert torch.allclose(batched[2], alone[0], atol=1e-5)


def test_chexbert_class_mapping(chexbert_dir, tmp_path):
    """Class 0 blank -> nan, 1 positive -> 1, 2 negative -> 0, 3 uncertain -> -1; No Finding 1 -> 1."""
    from utils.metrics.chexbert import CheXbertLabeler
    state = torch.load(chexbert_dir / "chexbert.pth", weights_only=True)["model_state_dict"]
    wanted = [1, 2, 3, 0] * 3 + [1, 1]
    for i, cls in enumerate(wanted):
        state[f"module.linear_heads.{i}.weight"].zero_()
        bias = torch.zeros_like(state[f"module.linear_heads.{i}.bias"])
        bias[cls] = 5.0
        state[f"module.linear_heads.{i}.bias"] = bias
    torch.save(state, tmp_path / "bare.pth")  # a bare state_dict (no "model_state_dict" wrapper) also loads
    lab = CheXbertLabeler(str(tmp_path / "bare.pth"), bert_dir=str(chexbert_dir))
    out = lab.label(["the heart is enlarged", "no effusion"])
    expected = np.array([1, 0, -1, NAN] * 3 + [1, 1], dtype=float)
    for row in out:
        assert np.array_equal(row, expected, equal_nan=True)


def test_chexbert_errors(chexbert_dir, tmp_path):
    from utils.metrics.chexbert import CheXbertLabeler
    state = torch.load(chexbert_dir / "chexbert.pth", weights_only=True)["model_state_dict"]
    state["module.linear_heads.14.weight"] = torch.zeros(2, 32)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        CheXbertLabeler(str(tmp_path / "bad.pth"), bert_dir=str(chexbert_dir))
    with pytest.raises(FileNotFoundError):
        CheXbertLabeler(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="checkpoint path"):
        build_labeler("chexbert")
    assert isinstance(build_labeler("rule"), RuleLabeler)
    assert build_labeler("chexbert", str(chexbert_dir / "chexbert.pth")).name == "chexbert"
