"""CheXbert from a local checkpoint: a tiny random one in the published layout."""
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, PreTrainedTokenizerFast

from metrics.chexbert import CheXbertLabeler, CheXbertModel
from metrics.clinical import build_labeler
from vocab.labeler import RuleLabeler

NAN = math.nan
REPORTS = [
    "The heart is enlarged. There is a small left pleural effusion.",
    "No pneumothorax. Lungs are clear.",
    "Mild pulmonary edema; cannot exclude pneumonia.",
    "Right lower lobe consolidation, likely pneumonia.",
    "Endotracheal tube in place. No acute osseous abnormality.",
    "Possible atelectasis at the left base.",
    "Stable cardiomegaly with mediastinal widening.",
    "Interval removal of the chest tube; no residual pneumothorax.",
]


@pytest.fixture(scope="module")
def chexbert_dir(tmp_path_factory):
    """A tiny random CheXbert checkpoint in the published layout + a WordPiece tokenizer, saved
    locally."""
    d = tmp_path_factory.mktemp("chexbert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        REPORTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    ids = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ids)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(d)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.save_pretrained(d)
    torch.manual_seed(0)
    model = CheXbertModel(config)
    # nn.DataParallel naming, as released
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": state}, d / "chexbert.pth")
    return d


def test_chexbert_loads_and_labels(chexbert_dir):
    lab = CheXbertLabeler(str(chexbert_dir / "chexbert.pth"), device="cpu", batch_size=3)
    # an empty report, one longer than max_position_embeddings
    texts = REPORTS[:7] + ["", "word " * 200]
    out = lab.label(texts)
    assert out.shape == (len(texts), 14)
    assert set(np.unique(out[~np.isnan(out)])) <= {1.0, 0.0, -1.0}
    assert set(np.unique(out[~np.isnan(out[:, 13]), 13])) <= {1.0}  # No Finding: blank or positive
    single = CheXbertLabeler(
        str(chexbert_dir / "chexbert.pth"), bert_dir=str(chexbert_dir), batch_size=1
    )
    # padding does not change a report's labels
    assert np.array_equal(single.label(texts), out, equal_nan=True)
    enc = lab.tokenizer(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = lab.model(enc["input_ids"], enc["attention_mask"])[0]
        alone = lab.model(**{k: v for k, v in lab.tokenizer(texts[2:3], return_tensors="pt").items()
                             if k in ("input_ids", "attention_mask")})[0]
    assert torch.allclose(batched[2], alone[0], atol=1e-5)


def test_chexbert_class_mapping(chexbert_dir, tmp_path):
    """Class 0 blank -> nan, 1 positive -> 1, 2 negative -> 0, 3 uncertain -> -1; No Finding 1 ->
    1."""
    state = torch.load(chexbert_dir / "chexbert.pth", weights_only=True)["model_state_dict"]
    wanted = [1, 2, 3, 0] * 3 + [1, 1]
    for i, cls in enumerate(wanted):
        state[f"module.linear_heads.{i}.weight"].zero_()
        bias = torch.zeros_like(state[f"module.linear_heads.{i}.bias"])
        bias[cls] = 5.0
        state[f"module.linear_heads.{i}.bias"] = bias
    # a bare state_dict (no "model_state_dict" wrapper) also loads
    torch.save(state, tmp_path / "bare.pth")
    lab = CheXbertLabeler(str(tmp_path / "bare.pth"), bert_dir=str(chexbert_dir))
    out = lab.label(["the heart is enlarged", "no effusion"])
    expected = np.array([1, 0, -1, NAN] * 3 + [1, 1], dtype=float)
    for row in out:
        assert np.array_equal(row, expected, equal_nan=True)


def test_chexbert_errors(chexbert_dir, tmp_path):
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
