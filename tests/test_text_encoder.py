import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from models.text_encoder import TextEncoder
from utils.config import load_config

TEXTS = [
    "the heart is normal in size.",
    "small left pleural effusion.",
    "no pneumothorax. lungs are clear.",
    "right upper lung zone opacity",
    "left costophrenic angle blunting",
    "cardiac silhouette enlarged",
]


def wordpiece(texts=TEXTS, vocab_size=120):
    """A tiny BERT-style WordPiece tokenizer (as datasets/tokenizer.py's train_wordpiece)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def tok():
    return wordpiece()


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return TextEncoder.from_sizes(
        tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=16
    ).eval()


def test_dropout_option(tok):
    """dropout=0: training-mode outputs are deterministic; BERT's default 0.1 makes them vary."""
    for p in (0.0, 0.1):
        enc = TextEncoder.from_sizes(
            tok,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_length=16,
            dropout=p,
        ).train()
        ids, mask = enc.tokenize(TEXTS[:3])
        with torch.no_grad():
            same = torch.equal(enc.encode(ids, mask)[1], enc.encode(ids, mask)[1])
        assert same == (p == 0.0), p


def test_pooled_is_mean_over_real_tokens(tok):
    enc = tiny(tok)
    assert enc.bert.pooler is None and enc.hidden_size == 32
    assert enc.bert.get_input_embeddings().num_embeddings == len(tok)
    ids, mask = enc.tokenize(TEXTS[:3])
    assert ids.shape == mask.shape and (mask == 0).any()  # padded batch
    with torch.no_grad():
        tokens, pooled = enc.encode(ids, mask)
        assert tokens.shape == (3, ids.shape[1], 32) and pooled.shape == (3, 32)
        for b in range(3):
            n = int(mask[b].sum())
            torch.testing.assert_close(pooled[b], tokens[b, :n].mean(0))
            # padding does not change a text's embedding
            _, alone = enc.encode_texts([TEXTS[b]])
            torch.testing.assert_close(alone[0], pooled[b], atol=1e-5, rtol=1e-5)


def test_truncation_and_gradients(tok):
    enc = tiny(tok).train()
    ids, _ = enc.tokenize([" ".join(TEXTS * 3)])
    assert ids.shape[1] == 16
    _, pooled = enc.encode_texts(TEXTS)
    pooled.pow(2).sum().backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None]
    assert unused == []  # no pooler, nothing DDP would call unused


def test_from_local_checkpoint(tok, tmp_path):
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(3)
    BertModel(config).save_pretrained(tmp_path / "bert")  # with a pooler, as real checkpoints are
    enc = TextEncoder.from_pretrained(str(tmp_path / "bert"), tok, max_length=128)
    assert enc.bert.pooler is None and enc.max_length == 64  # capped at the checkpoint's positions
    ref = BertModel.from_pretrained(tmp_path / "bert").eval()
    enc.eval()
    ids, mask = enc.tokenize(TEXTS[:2])
    with torch.no_grad():
        tokens, _ = enc.encode(ids, mask)
        torch.testing.assert_close(
            tokens, ref(input_ids=ids, attention_mask=mask).last_hidden_state
        )
    small = BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    BertModel(small).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="tokenizer"):
        TextEncoder.from_pretrained(str(tmp_path / "small"), tok)


def test_from_config(tok, tmp_path):
    cfg = load_config(
        overrides=[
            "model.text.hidden_size=32",
            "model.text.num_layers=1",
            "model.text.num_heads=2",
            "model.text.intermediate_size=64",
            "model.text.max_length=20",
            "model.text.freeze=true",
        ]
    )
    enc = TextEncoder.from_config(cfg.model.text, tok)
    assert enc.max_length == 20 and len(enc.bert.encoder.layer) == 1
    assert not any(p.requires_grad for p in enc.parameters())
