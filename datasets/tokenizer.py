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

import itertools
import tempfile
from collections import Counter
from pathlib import Path

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

from utils.checkpoint import CheckpointError, pack_files, unpack_files
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
    given). Deterministic: the same texts give the same vocabulary and ids in any process."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(BERT_SPECIALS.values())
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(words, vocab_size, specials),
                                     unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                   clean_up_tokenization_spaces=False, **BERT_SPECIALS)
    return _save(fast, save_dir)


def _wordpiece_vocab(words: Counter, vocab_size: int, specials: list[str]) -> dict[str, int]:
    """The vocabulary of ``tokenizers``' WordPiece trainer (BPE merges whose non-initial pieces
    carry "##"), learnt deterministically. That trainer numbers the "##x" pieces in hash-map order,
    which breaks ties between equally frequent merges differently in every process. Here each
    non-initial character becomes its own unused private-use character, so that a plain BPE trainer
    (sorted alphabet, ties broken by id) learns the merges; the pieces are then mapped back."""
    used = {c for w in words for c in w}
    conts = sorted({c for w in words for c in w[1:]})
    free = (chr(c) for c in itertools.chain(range(0xE000, 0xF900), range(0xF0000, 0xFFFFE),
                                            range(0x100000, 0x10FFFE)) if chr(c) not in used)
    mark = dict(zip(conts, free))
    if len(mark) < len(conts):
        raise ValueError(f"train_wordpiece: {len(conts)} distinct characters, too many to train on")
    back = {m: c for c, m in mark.items()}

    def marked():  # every word as often as it occurs, in chunks of whitespace-separated copies
        for word, count in sorted(words.items()):
            w = word[0] + "".join(mark[c] for c in word[1:])
            for start in range(0, count, 1000):
                yield " ".join([w] * min(1000, count - start))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(marked(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    vocab = {}
    for piece, i in bpe.get_vocab().items():
        if piece not in specials:
            piece = ("##" if piece[0] in back else "") + "".join(back.get(c, c) for c in piece)
        vocab[piece] = i
    return vocab


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


def run_tokenizers(cfg, train_reports, run_dir, resumed=None, pretrained=None):
    """The run's tokenizers, kept in run_dir/tokenizers/ and stored in its checkpoints
    (``tokenizer_files``). Per tokenizer, the first of: those of the checkpoint resumed from
    (``resumed`` = (path, checkpoint dict)), wherever it lies - they replace the run dir's; the run
    dir's own; those of the ``train.pretrained`` checkpoint (``pretrained``, same form) where the
    config names none; cfg.model.*.tokenizer (or the one in cfg.model.*.path); trained on
    ``train_reports``. Rank 0 builds, the others load. cfg.model.*.tokenizer then point at the
    run's folders. Returns (text_tok, decoder_tok)."""
    save_dir = Path(run_dir) / "tokenizers"
    toks = None
    if is_main_process():
        if resumed is not None:
            _adopt(stored_tokenizer_files(*resumed), resumed[0], save_dir, replace=True)
        elif pretrained is not None:
            named = {"text": cfg.model.text.tokenizer, "decoder": cfg.model.decoder.tokenizer}
            if not all(named.values()):
                files = stored_tokenizer_files(*pretrained)
                _adopt({k: v for k, v in files.items() if not named[k]}, pretrained[0], save_dir)
        toks = build_tokenizers(cfg, train_reports, save_dir)
    barrier()
    if toks is None:
        toks = build_tokenizers(cfg, train_reports, save_dir)
    cfg.model.text.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["text"]).resolve())
    cfg.model.decoder.tokenizer = str((Path(run_dir) / TOKENIZER_DIRS["decoder"]).resolve())
    return toks


def _adopt(files: dict, source, save_dir: Path, replace: bool = False) -> None:
    """Write the stored tokenizers ``files`` ({"text"|"decoder": files}) of checkpoint ``source``
    into the run's folders: all of them with ``replace`` (saying which differed), else only where
    the run dir has none."""
    for key, content in files.items():
        out = save_dir / f"{key}_tokenizer"
        if _has_tokenizer(out):
            if not replace:
                continue
            if not _same_files(pack_files(out), content):
                print(f"tokenizers: {out} replaced by the {key} tokenizer stored in {source}")
        unpack_files(content, out)


def _same_files(a: dict, b: dict) -> bool:
    def raw(v):
        return v.encode() if isinstance(v, str) else v.numpy().tobytes()
    return a.keys() == b.keys() and all(raw(a[k]) == raw(b[k]) for k in a)


def tokenizer_files(run_dir) -> dict:
    """The run's tokenizers as every checkpoint stores them (extra["tokenizer_files"]):
    {"text": files, "decoder": files}, each the ``utils.checkpoint.pack_files`` of its folder."""
    return {k: pack_files(Path(run_dir) / d) for k, d in TOKENIZER_DIRS.items()}


def stored_tokenizer_files(path, ckpt: dict) -> dict:
    """{"text": files, "decoder": files} of the checkpoint ``ckpt`` read from ``path``: stored in it,
    or (written before tokenizers were stored) read from the folders its extra["tokenizers"] names
    next to it. CheckpointError naming the file when there are none."""
    extra = ckpt.get("extra") or {}
    if extra.get("tokenizer_files"):
        return extra["tokenizer_files"]
    files = {}
    for key, rel in (extra.get("tokenizers") or TOKENIZER_DIRS).items():
        folder = Path(path).resolve().parent / rel
        if not _has_tokenizer(folder):
            raise CheckpointError(f"{path} stores no tokenizers, and the {key} tokenizer folder of "
                                  f"its run, {folder}, has none")
        files[key] = pack_files(folder)
    return files


def checkpoint_tokenizers(path, ckpt: dict):
    """(text_tokenizer, decoder_tokenizer) of a checkpoint (``stored_tokenizer_files``)."""
    files = stored_tokenizer_files(path, ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        return tuple(load_tokenizer(unpack_files(files[k], Path(tmp) / k))
                     for k in ("text", "decoder"))
