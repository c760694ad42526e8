"""Tokenizers: WordPiece for the BERT-style text encoder, byte-level BPE for the report decoder.

Both are trained with the ``tokenizers`` library on the training reports and wrapped as
transformers ``PreTrainedTokenizerFast`` (save_pretrained / AutoTokenizer round trip), or
loaded from any local Hugging Face tokenizer folder. Nothing is downloaded.

- WordPiece: lower-cased BERT normalisation, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4,
  encodes as ``[CLS] ... [SEP]``.
- BPE: byte-level (lossless: ``decode(encode(text)) == text``), "<|endoftext|>"=0 (eos),
  "<|bos|>"=1, "<|pad|>"=2; like GPT-2 it adds no special tokens itself - the report
  decoder puts bos/eos around the report.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from utils.dist import barrier, is_main_process

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
BPE_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def _save(tok: PreTrainedTokenizerFast, save_dir) -> PreTrainedTokenizerFast:
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(save_dir))
    return tok


def train_wordpiece(texts, vocab_size: int, save_dir=None) -> PreTrainedTokenizerFast:
    """A lower-cased BERT WordPiece tokenizer trained on ``texts`` (saved to ``save_dir`` if
    given)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(BERT_SPECIALS.values())
    tok.train_from_iterator(
        list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                   clean_up_tokenization_spaces=False, **BERT_SPECIALS)
    return _save(fast, save_dir)


def train_bpe(texts, vocab_size: int, save_dir=None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` with bos/eos/pad (saved to ``save_dir`` if
    given)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **BPE_SPECIALS
    )
    return _save(fast, save_dir)


def load_tokenizer(folder) -> PreTrainedTokenizerFast:
    """Any local Hugging Face tokenizer folder (a bare GPT-2 vocab.json + merges.txt too),
    with a pad token ensured (eos, else sep, else a new "[PAD]")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise
        tok = GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.sep_token is not None:
            tok.pad_token = tok.sep_token
        else:
            tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def _has_tokenizer(folder) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def _build_one(name: str, section: str, given, model_path, train_fn, texts, vocab_size, save_dir):
    """The tokenizer ``name``: from save_dir (a resumed run), from the configured folder
    (or the pretrained model's folder), else trained; saved into save_dir/name. A pretrained model
    folder without a tokenizer (and none configured) is an error: a newly trained vocabulary's ids
    would not match its embeddings."""
    out = Path(save_dir) / name if save_dir is not None else None
    if out is not None and _has_tokenizer(out):
        return load_tokenizer(out)
    src = given or (model_path if _has_tokenizer(model_path) else None)
    if src:
        return _save(load_tokenizer(src), out)
    if model_path:
        raise FileNotFoundError(
            f"{name}: the model folder {model_path} has no tokenizer files "
            f"({', '.join(_TOKENIZER_FILES)}); a newly trained one would not match its embeddings. "
            f"Add the model's tokenizer there or name its folder in model.{section}.tokenizer"
        )
    return train_fn(texts, vocab_size, out)


def build_tokenizers(cfg, train_reports, save_dir=None):
    """(text_tokenizer, decoder_tokenizer) for ``cfg``: local folders from cfg.model.text.tokenizer
    / cfg.model.decoder.tokenizer (or the tokenizer inside cfg.model.*.path, an error when that
    folder has none), else trained on ``train_reports``. With ``save_dir`` both are saved to
    save_dir/{text,decoder}_tokenizer and reloaded from there on the next call (resume, other ranks
    after a barrier)."""
    texts = list(train_reports)
    m = cfg.model
    text_tok = _build_one("text_tokenizer", "text", m.text.tokenizer, m.text.path, train_wordpiece,
                          texts, m.text.vocab_size, save_dir)
    dec_tok = _build_one("decoder_tokenizer", "decoder", m.decoder.tokenizer, m.decoder.path,
                         train_bpe, texts, m.decoder.vocab_size, save_dir)
    return text_tok, dec_tok


TOKENIZER_DIRS = {"text": "tokenizers/text_tokenizer", "decoder": "tokenizers/decoder_tokenizer"}


def run_tokenizers(cfg, train_reports, run_dir, inherit: dict | None = None):
    """The run's tokenizers, saved under run_dir/tokenizers/ so that its checkpoints reload without
    the data: the run dir's own (resume) > ``inherit`` (folders of the pretraining run, used
    where the config names none) > cfg.model.*.tokenizer > trained on ``train_reports``. Rank 0
    builds, the others load. cfg.model.*.tokenizer then point at the saved folders. Returns
    (text_tok, decoder_tok, folders relative to the run dir) - the latter go into every
    checkpoint."""
    for key, folder in (inherit or {}).items():
        section = cfg.model.text if key == "text" else cfg.model.decoder
        if not section.tokenizer:
            section.tokenizer = str(folder)
    save_dir = Path(run_dir) / "tokenizers"
    toks = build_tokenizers(cfg, train_reports, save_dir) if is_main_process() else None
    barrier()
    if toks is None:
        toks = build_tokenizers(cfg, train_reports, save_dir)
    cfg.model.text.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["text"]).resolve())
    cfg.model.decoder.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["decoder"]).resolve())
    return toks[0], toks[1], dict(TOKENIZER_DIRS)


def checkpoint_tokenizers(path) -> dict[str, Path]:
    """Tokenizer folders recorded in a checkpoint, resolved against the checkpoint's own folder."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rel = ckpt.get("extra", {}).get("tokenizers") or TOKENIZER_DIRS
    return {k: Path(path).resolve().parent / v for k, v in rel.items()}
