import json
import shutil

import pytest
import torch

from datasets.tokenizer import (
    TOKENIZER_DIRS,
    build_tokenizers,
    checkpoint_tokenizers,
    load_tokenizer,
    run_tokenizers,
    tokenizer_files,
    train_bpe,
    train_wordpiece,
)
from tests.helpers import python
from utils.checkpoint import CheckpointError
from utils.config import load_config
from vocab.report_text import clean_report

REPORTS = [clean_report(t) for t in [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "There is a right lower lobe opacity. The lungs are otherwise clear.",
    "Moderate cardiomegaly. Small left pleural effusion.",
    "Right internal jugular central venous catheter with tip at the cavoatrial junction.",
    "No acute osseous abnormality. The mediastinal contours are normal.",
]] * 20


def test_wordpiece_train_save_reload(tmp_path):
    tok = train_wordpiece(REPORTS, 200, tmp_path / "wp")
    ids = tok("The heart size is normal .")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert (
        tok.pad_token_id,
        tok.unk_token_id,
        tok.cls_token_id,
        tok.sep_token_id,
        tok.mask_token_id,
    ) == (0, 1, 2, 3, 4)
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["the", "heart"]          # lower-cased
    again = load_tokenizer(tmp_path / "wp")
    assert again(REPORTS[1])["input_ids"] == tok(REPORTS[1])["input_ids"]
    assert again.pad_token_id == 0 and len(again) == len(tok)
    batch = again(REPORTS[:3], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"] == 0).any()


def test_bpe_train_save_reload_round_trip(tmp_path):
    tok = train_bpe(REPORTS, 420, tmp_path / "bpe")
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|bos|>", "<|pad|>")
    assert len({tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}) == 3
    again = load_tokenizer(tmp_path / "bpe")
    for text in REPORTS[:5] + ["an unseen word: zebra 12%"]:
        ids = again(text)["input_ids"]
        assert ids == tok(text)["input_ids"] and tok.bos_token_id not in ids   # no specials added
        # byte level: lossless
        assert again.decode(ids) == text
    assert len(again(REPORTS[0])["input_ids"]) < len(REPORTS[0].split()) * 2   # merges were learnt


def test_load_gpt2_style_folder_adds_pad(tmp_path):
    tok = train_bpe(REPORTS, 280)
    state = json.loads(tok.backend_tokenizer.to_str())
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(state["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    loaded = load_tokenizer(folder)
    assert loaded.pad_token is not None
    assert loaded.decode(loaded(REPORTS[2])["input_ids"]) == REPORTS[2]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_build_tokenizers_trains_saves_and_reuses(tmp_path):
    cfg = load_config(overrides=["model.text.vocab_size=150", "model.decoder.vocab_size=260"])
    text_tok, dec_tok = build_tokenizers(cfg, REPORTS, tmp_path / "run")
    assert (tmp_path / "run" / "text_tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "decoder_tokenizer" / "tokenizer.json").is_file()
    assert len(text_tok) == 150 and len(dec_tok) == 260
    # a second call (resume) reloads the saved ones rather than training on other texts
    t2, d2 = build_tokenizers(cfg, ["something else entirely"], tmp_path / "run")
    assert t2.get_vocab() == text_tok.get_vocab() and d2.get_vocab() == dec_tok.get_vocab()
    # configured folders are loaded (and copied into the new run)
    cfg = load_config(
        overrides=[
            f"model.text.tokenizer={tmp_path / 'run' / 'text_tokenizer'}",
            f"model.decoder.tokenizer={tmp_path / 'run' / 'decoder_tokenizer'}",
        ]
    )
    t3, d3 = build_tokenizers(cfg, ["other"], tmp_path / "run2")
    assert t3.get_vocab() == text_tok.get_vocab() and d3.get_vocab() == dec_tok.get_vocab()
    assert (tmp_path / "run2" / "decoder_tokenizer" / "tokenizer.json").is_file()
    t4, d4 = build_tokenizers(load_config(overrides=["model.text.vocab_size=150"]), REPORTS, None)
    assert len(t4) == 150


WORDS = [clean_report(t) for t in [
    "Left lower lobe consolidation, new since the prior study.",
    "Mild pulmonary vascular congestion without frank edema.",
    "Enteric tube terminates in the stomach; endotracheal tube 4 cm above the carina.",
    "Compression deformity of a mid thoracic vertebral body.",
    "Calcification of the aortic knob. Elevated right hemidiaphragm.",
]] * 7 + REPORTS


def test_wordpiece_training_is_deterministic_in_and_across_processes(tmp_path):
    """The tokenizers library's WordPiece trainer numbered its '##' pieces in hash-map order:
    two trainings on the same texts gave different vocabularies (and ids)."""
    first = train_wordpiece(WORDS, 160).backend_tokenizer.to_str()
    assert all(train_wordpiece(WORDS, 160).backend_tokenizer.to_str() == first for _ in range(4))
    code = ("import sys, json; from datasets.tokenizer import train_wordpiece; "
            "sys.stdout.write(train_wordpiece(json.load(open(sys.argv[1])), 160)"
            ".backend_tokenizer.to_str())")
    (tmp_path / "texts.json").write_text(json.dumps(WORDS))
    for _ in range(2):
        assert python("-c", code, tmp_path / "texts.json").stdout == first
    tok = train_wordpiece(WORDS, 160)
    vocab = tok.get_vocab()
    assert len(vocab) == 160 and sorted(vocab.values()) == list(range(160))
    assert {"the", "##s", "[CLS]"} <= set(vocab) and "##" not in vocab
    # every word is covered: pieces, not [UNK], that join back into the words
    for text in WORDS[:5]:
        pieces = tok.tokenize(text)
        assert tok.unk_token not in pieces
        assert " ".join(pieces).replace(" ##", "") == text


def test_checkpoint_tokenizers_are_read_from_the_checkpoint_wherever_it_lies(tmp_path):
    cfg = load_config(overrides=["model.text.vocab_size=150", "model.decoder.vocab_size=260"])
    run = tmp_path / "run"
    text_tok, dec_tok = run_tokenizers(cfg, REPORTS, run)
    files = tokenizer_files(run)
    assert set(files) == {"text", "decoder"} and "tokenizer.json" in files["text"]
    torch.save({"model": {}, "extra": {"tokenizer_files": files}}, tmp_path / "c.pth")
    shutil.rmtree(run)  # only the checkpoint is left
    ckpt = torch.load(tmp_path / "c.pth", weights_only=True)
    t2, d2 = checkpoint_tokenizers(tmp_path / "c.pth", ckpt)
    assert t2.get_vocab() == text_tok.get_vocab() and d2.get_vocab() == dec_tok.get_vocab()
    # a checkpoint written before tokenizers were stored: the folders named next to it
    old = {"model": {}, "extra": {"tokenizers": {"text": "tok/text_tokenizer",
                                                 "decoder": "tok/decoder_tokenizer"}}}
    with pytest.raises(CheckpointError, match="stores no tokenizers, and the text tokenizer"):
        checkpoint_tokenizers(tmp_path / "old.pth", old)
    build_tokenizers(load_config(overrides=["model.text.vocab_size=150"]), REPORTS, tmp_path / "tok")
    t3, _ = checkpoint_tokenizers(tmp_path / "old.pth", old)
    assert t3.get_vocab() == text_tok.get_vocab()


def test_run_tokenizers_take_the_resumed_then_the_pretrained_checkpoints(tmp_path, capsys):
    cfg = load_config(overrides=["model.text.vocab_size=150", "model.decoder.vocab_size=260"])
    run_tokenizers(cfg, REPORTS, tmp_path / "a")
    stored = {"model": {}, "extra": {"tokenizer_files": tokenizer_files(tmp_path / "a")}}
    other = [clean_report("Cardiomegaly. Small bilateral effusions. Pacemaker leads intact.")] * 9
    run_tokenizers(load_config(overrides=["model.text.vocab_size=100"]), other, tmp_path / "b")
    assert tokenizer_files(tmp_path / "b") != stored["extra"]["tokenizer_files"]
    # resuming into b: the checkpoint's replace b's, and it is said
    cfg = load_config(overrides=["model.text.vocab_size=100"])
    text_tok, _ = run_tokenizers(cfg, other, tmp_path / "b", resumed=(tmp_path / "a.pth", stored))
    assert tokenizer_files(tmp_path / "b") == stored["extra"]["tokenizer_files"]
    assert len(text_tok) == 150 and "replaced by the text tokenizer stored in" in (
        capsys.readouterr().out)
    assert cfg.model.text.tokenizer == str((tmp_path / "b" / TOKENIZER_DIRS["text"]).resolve())
    # fine-tuning from a pretrained checkpoint: its tokenizers where the config names none
    run_tokenizers(load_config(), other, tmp_path / "c0")  # other tokenizers, to be named
    cfg = load_config(overrides=[f"model.text.tokenizer={tmp_path / 'c0' / TOKENIZER_DIRS['text']}"])
    run_tokenizers(cfg, other, tmp_path / "c", pretrained=(tmp_path / "a.pth", stored))
    got, named = tokenizer_files(tmp_path / "c"), tokenizer_files(tmp_path / "c0")
    assert got["decoder"] == stored["extra"]["tokenizer_files"]["decoder"]
    vocab = got["text"]["tokenizer.json"]
    assert vocab == named["text"]["tokenizer.json"]
    assert vocab != stored["extra"]["tokenizer_files"]["text"]["tokenizer.json"]


def test_model_folder_without_tokenizer_is_an_error_naming_it(tmp_path):
    """A pretrained LM's ids must be its own tokenizer's: a folder without one is not silently given
    a newly trained vocabulary; naming a tokenizer folder resolves it."""
    lm = tmp_path / "gpt2"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = load_config(overrides=["model.text.vocab_size=150", "model.decoder.vocab_size=260",
                                 f"model.decoder.path={lm}"])
    with pytest.raises(FileNotFoundError, match="model.decoder.tokenizer") as e:
        build_tokenizers(cfg, REPORTS, tmp_path / "run")
    assert str(lm) in str(e.value)
    train_bpe(REPORTS, 280, tmp_path / "gpt2_tokenizer")
    cfg.model.decoder.tokenizer = str(tmp_path / "gpt2_tokenizer")
    _, dec = build_tokenizers(cfg, REPORTS, tmp_path / "run")
    assert len(dec) == 280
    # a folder with its tokenizer needs nothing else
    train_bpe(REPORTS, 270, lm)
    cfg.model.decoder.tokenizer = None
    assert len(build_tokenizers(cfg, REPORTS, tmp_path / "run2")[1]) == 270
    cfg = load_config(overrides=["model.text.vocab_size=150", f"model.text.path={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="model.text.tokenizer"):
        build_tokenizers(cfg, REPORTS, None)
