"""CheXbert labeler (Smit et al., 2020) from a local checkpoint; nothing is ever downloaded.

Architecture as in stanfordmlgroup/CheXbert ``bert_labeler``: BertModel (bert-base) -> [CLS] hidden
state -> dropout -> 13 linear heads with 4 classes (0 blank, 1 positive, 2 negative, 3 uncertain)
for the first 13 observations and 1 head with 2 classes (0 blank, 1 positive) for "No Finding", in
CHEXPERT_OBSERVATIONS order. Output uses the RuleLabeler convention: 1 positive, 0 negative, -1
uncertain, nan blank.

The published ``chexbert.pth`` is ``{"model_state_dict": ...}`` saved from ``nn.DataParallel``
("module." prefix); a bare state_dict works too. BERT config and tokenizer come from a local folder
(``bert_dir``: config.json + tokenizer files or vocab.txt of bert-base-uncased); without config.json
the bert-base-uncased sizes (transformers' ``BertConfig()`` defaults) are used.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

from vocab.observations import CHEXPERT_OBSERVATIONS

# CheXbert class index -> label value (the "No Finding" head only has 0 and 1)
CLASS_TO_VALUE = np.array([np.nan, 1.0, 0.0, -1.0])


class CheXbertModel(nn.Module):
    """bert + dropout + 14 linear heads (13 x 4 classes, 1 x 2 classes); parameter names match the
    release."""

    def __init__(self, config: BertConfig, dropout: float = 0.1, add_pooling_layer: bool = True):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)
        self.dropout = nn.Dropout(dropout)
        n = len(CHEXPERT_OBSERVATIONS)
        heads = [nn.Linear(config.hidden_size, 4) for _ in range(n - 1)] + [
            nn.Linear(config.hidden_size, 2)
        ]
        self.linear_heads = nn.ModuleList(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        cls = self.dropout(cls)
        return [head(cls) for head in self.linear_heads]


def load_chexbert_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a CheXbert checkpoint, with the DataParallel "module." prefix
    removed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt:
        raise ValueError(f"{path}: not a CheXbert checkpoint (no state_dict found)")
    return {re.sub(r"^module\.", "", k): v for k, v in ckpt.items()}


def _load_tokenizer(folder: str):
    if any(
        os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = os.path.join(folder, "vocab.txt")
    if os.path.exists(vocab):
        return BertTokenizer(vocab=vocab, do_lower_case=True)
    raise FileNotFoundError(
        f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json / vocab.txt); "
        "point bert_dir at a local bert-base-uncased folder"
    )


class CheXbertLabeler:
    """``CheXbertLabeler(path, bert_dir=None, device="cpu", batch_size=32).label(texts) -> [N, 14]``
    floats."""

    name = "chexbert"

    def __init__(self, path: str, bert_dir: str | None = None, device="cpu", batch_size: int = 32):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CheXbert checkpoint not found: {path}")
        bert_dir = bert_dir or os.path.dirname(os.path.abspath(path))
        cfg_file = os.path.join(bert_dir, "config.json")
        config = (
            BertConfig.from_pretrained(bert_dir, local_files_only=True)
            if os.path.exists(cfg_file)
            else BertConfig()
        )
        state = load_chexbert_state_dict(path)
        # buffer of old transformers
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        self.model = CheXbertModel(
            config, add_pooling_layer=any(k.startswith("bert.pooler.") for k in state)
        )
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: checkpoint does not match the CheXbert architecture with the config in "
                f"{bert_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.tokenizer = _load_tokenizer(bert_dir)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = min(512, config.max_position_embeddings)

    @staticmethod
    def clean(text: str) -> str:
        """CheXbert's report preprocessing: strip, newlines -> spaces, collapse whitespace."""
        return re.sub(r"\s+", " ", (text or "").strip().replace("\n", " ")).strip()

    @torch.inference_mode()
    def label(self, texts: list[str]) -> np.ndarray:
        """[N, 14] float array: 1 positive, 0 negative, -1 uncertain, nan blank (batched, longest
        first)."""
        texts = [self.clean(t) for t in texts]
        out = np.full((len(texts), len(CHEXPERT_OBSERVATIONS)), np.nan)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            logits = self.model(
                enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            )
            classes = torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu().numpy()
            out[idx] = CLASS_TO_VALUE[classes]
        return out

    __call__ = label
