"""BERT-style text encoder for reports and anatomy names.

Pooling: the mean of the last hidden states over non-pad tokens (the sentence-transformers
convention, so a local MiniLM checkpoint pools as it was trained). Built without BERT's pooler
(``add_pooling_layer=False``) so that no parameter goes unused under DDP.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel


class TextEncoder(nn.Module):
    def __init__(self, bert: nn.Module, tokenizer, max_length: int = 128):
        super().__init__()
        self.bert = bert
        # a PreTrainedTokenizerFast (not a module, not in the state_dict)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @classmethod
    def from_sizes(cls, tokenizer, hidden_size: int = 384, num_layers: int = 6, num_heads: int = 6,
                   intermediate_size: int = 1536, max_length: int = 128, dropout: float = 0.1) -> "TextEncoder":
        """A randomly initialised BertModel; its vocabulary is the tokenizer's; ``dropout`` on
        hidden states and attention (BERT's 0.1)."""
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id or 0,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return cls(BertModel(config, add_pooling_layer=False), tokenizer, max_length)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer, max_length: int = 128) -> "TextEncoder":
        """Any local BERT-style checkpoint folder (no hub access)."""
        try:
            bert = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        except TypeError:  # architectures without that switch: drop the pooler after loading
            bert = AutoModel.from_pretrained(path, local_files_only=True)
            if getattr(bert, "pooler", None) is not None:
                bert.pooler = None
        vocab = bert.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(
                f"text tokenizer has {len(tokenizer)} tokens but {path} embeds {vocab}: "
                "use the checkpoint's own tokenizer (model.text.tokenizer)"
            )
        max_pos = getattr(bert.config, "max_position_embeddings", max_length)
        return cls(bert, tokenizer, min(max_length, max_pos))

    @classmethod
    def from_config(cls, text_cfg, tokenizer) -> "TextEncoder":
        """From ``cfg.model.text``: a local checkpoint when ``path`` is set, else built from the
        sizes."""
        if text_cfg.path:
            enc = cls.from_pretrained(text_cfg.path, tokenizer, text_cfg.max_length)
        else:
            enc = cls.from_sizes(
                tokenizer,
                text_cfg.hidden_size,
                text_cfg.num_layers,
                text_cfg.num_heads,
                text_cfg.intermediate_size,
                text_cfg.max_length,
                text_cfg.dropout,
            )
        if text_cfg.freeze:
            enc.requires_grad_(False)
        return enc

    def tokenize(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] (padded to the longest, truncated to max_length)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def encode(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T, H] (last hidden states) and pooled [B, H] (mean over non-pad tokens)."""
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.to(tokens.dtype)[..., None]
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        return tokens, pooled

    def encode_texts(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(*self.tokenize(texts, device))

    def forward(self, input_ids, attention_mask):
        return self.encode(input_ids, attention_mask)
