"""Report generation: a causal LM that reads a projected visual prefix and an entity prompt.

Token layout of one row (N visual tokens = [25 leaf queries, CLS, patches]):
  training    [visual][prompt][bos][report][eos][pad ...]      right padded, loss on report + eos only
  generation  [visual][pad ...][prompt][bos] -> new tokens      text left padded
Masked-out visual tokens (anatomies the study does not concern) and padding get attention_mask 0,
and position ids are the cumulative sum of the attention mask, passed explicitly in both paths: a
masked token has no influence at all and a row reads exactly as if it had never been there.
Generation is a hand-written greedy / beam loop over a KV cache (DynamicCache); beam search is
tensorised over the batch and the beams (no Python loop per beam).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

IGNORE = -100
DECODING_KEYS = (
    "beam_size",
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "length_penalty",
)


def decoding_options(eval_cfg) -> dict:
    """``ReportDecoder.generate``'s options from ``cfg.eval``."""
    return {k: eval_cfg[k] for k in DECODING_KEYS}


def visual_prefix(leaf_tokens: torch.Tensor, cls: torch.Tensor, patches: torch.Tensor,
                  leaves_shown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's visual tokens [B, K + 1 + L, D] = [leaf tokens, CLS, patches] and their attention
    mask (a leaf token only where ``leaves_shown`` [B, K] says so; CLS and patches always)."""
    visual = torch.cat([leaf_tokens, cls[:, None], patches], dim=1)
    rest = leaves_shown.new_ones(leaves_shown.shape[0], 1 + patches.shape[1])
    return visual, torch.cat([leaves_shown.bool(), rest.bool()], dim=1)


def build_lm(path: str | None, tokenizer, n_embd: int = 768, n_layer: int = 12, n_head: int = 12,
             n_positions: int = 512, dropout: float = 0.1) -> nn.Module:
    """A Hugging Face causal LM from a local folder (any architecture, its own dropout), or a fresh
    GPT-2 of the given size with ``dropout`` on embeddings, residuals and attention (GPT-2's
    0.1)."""
    ids = _special_ids(tokenizer)
    if path:
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            n_positions=n_positions, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                            pad_token_id=ids["pad"], resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        lm = GPT2LMHeadModel(config)
    lm.config.pad_token_id = ids["pad"]
    return lm


def apply_lora(lm: nn.Module, r: int, alpha: int, dropout: float, target_modules) -> nn.Module:
    """Wrap ``lm`` with peft LoRA adapters; only the adapters train (peft freezes the base
    model)."""
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    return get_peft_model(lm, config)


def _special_ids(tokenizer) -> dict[str, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("report decoder: the tokenizer has no eos token")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos": bos, "eos": eos, "pad": pad}


class ReportDecoder(nn.Module):
    """Causal LM ``lm`` (kept at this attribute: the optimizer gives it its own lr scale) with a
    visual prefix."""

    def __init__(self, lm: nn.Module, tokenizer, visual_dim: int, max_report_tokens: int = 100):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_report_tokens = max_report_tokens
        ids = _special_ids(tokenizer)
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        hidden = lm.get_input_embeddings().embedding_dim
        self.visual_proj = nn.Linear(visual_dim, hidden)
        # absolute-position LMs only (GPT-2)
        self.max_positions = getattr(lm.config, "n_positions", None)

    # ---------------------------------------------------------------- inputs
    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _inputs(self, visual, visual_mask, rows: list[list[int]], left_pad: bool):
        """Embeddings, attention mask and position ids of [visual][text rows padded to one
        length]."""
        dev = visual.device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        tok = self._embed_tokens(ids)
        vis = self.visual_proj(visual).to(tok.dtype)
        embeds = torch.cat([vis, tok], 1)
        attn = torch.cat([visual_mask.to(dev, torch.long), mask], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return embeds, attn, pos

    def _check_positions(self, attn: torch.Tensor, new_tokens: int = 0):
        """Absolute-position LMs: the last position must exist (checked on the host unless it may
        not)."""
        if self.max_positions is None or attn.shape[1] + new_tokens <= self.max_positions:
            return
        last = int(attn.sum(-1).max()) - 1 + new_tokens
        if last >= self.max_positions:
            raise ValueError(f"report decoder: sequence needs position {last} but the LM has only "
                             f"{self.max_positions} positions (raise model.decoder.n_positions)")

    # ---------------------------------------------------------------- training
    def teacher_forced(
        self, visual, visual_mask, prompt_ids: list[list[int]], report_ids: list[list[int]]
    ):
        """Logits ``[B,T,V]`` over the text part and targets ``[B,T]`` (IGNORE outside report +
        eos)."""
        rows, targets = [], []
        for p, r in zip(prompt_ids, report_ids):
            rows.append(p + [self.bos_id] + r + [self.eos_id])
            # logit i predicts token i+1
            targets.append([IGNORE] * len(p) + r + [self.eos_id] + [IGNORE])
        embeds, attn, pos = self._inputs(visual, visual_mask, rows, left_pad=False)
        self._check_positions(attn)
        width = embeds.shape[1] - visual.shape[1]
        tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, t in enumerate(targets):
            tgt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        out = self.lm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=False,
                      logits_to_keep=width)
        return out.logits, tgt.to(visual.device)

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor, prompts: list[str],
                reports: list[str]) -> torch.Tensor:
        """Mean cross-entropy over the report tokens (+ eos); reports truncated to
        ``max_report_tokens``."""
        report_ids = [r[:self.max_report_tokens] for r in self.encode(reports)]
        logits, tgt = self.teacher_forced(visual, visual_mask, self.encode(prompts), report_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        prompts: list[str],
        beam_size: int = 1,
        max_new_tokens: int = 100,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ) -> list[str]:
        """Greedy (``beam_size`` 1) or beam search; returns the decoded reports (special tokens
        dropped)."""
        if max_new_tokens <= 0:
            return [""] * visual.shape[0]
        rows = [p + [self.bos_id] for p in self.encode(prompts)]
        embeds, attn, pos = self._inputs(visual, visual_mask, rows, left_pad=True)
        self._check_positions(attn, max_new_tokens)
        if beam_size <= 1:
            tokens, _ = self.greedy_search(
                embeds, attn, pos, max_new_tokens, min_new_tokens, repetition_penalty
            )
        else:
            tokens, _ = self.beam_search(
                embeds,
                attn,
                pos,
                beam_size,
                max_new_tokens,
                min_new_tokens,
                repetition_penalty,
                length_penalty,
            )
        return self.decode(tokens)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token rows -> text, cut at the first eos."""
        out = []
        for row in tokens.tolist():
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    def _step(self, embeds, attn, pos, cache):
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _process(self, logits, seen, step: int, min_new_tokens: int, repetition_penalty: float):
        """HF-style repetition penalty on the tokens generated so far; eos blocked before
        min_new_tokens."""
        if repetition_penalty != 1.0:
            penalised = torch.where(
                logits < 0, logits * repetition_penalty, logits / repetition_penalty
            )
            logits = torch.where(seen, penalised, logits)
        if step < min_new_tokens:
            logits = logits.clone()
            logits[:, self.eos_id] = float("-inf")
        return logits

    def greedy_search(self, embeds, attn, pos, max_new_tokens: int, min_new_tokens: int = 0,
                      repetition_penalty: float = 1.0, return_logits: bool = False):
        """Greedy decoding from a prefix. Returns tokens ``[B,S]`` (pad after eos) and, if asked,
        the raw per-step logits ``[B,S,V]`` (before penalties)."""
        B, P = attn.shape
        dev = embeds.device
        cache = DynamicCache()
        logits = self._step(embeds, attn, pos, cache)
        full_attn = torch.cat([attn, attn.new_ones(B, max_new_tokens)], 1)
        next_pos = attn.sum(-1, keepdim=True)
        tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        all_logits = []
        for t in range(max_new_tokens):
            if return_logits:
                all_logits.append(logits)
            tok = self._process(logits, seen, t, min_new_tokens, repetition_penalty).argmax(-1)
            tok = tok.masked_fill(finished, self.pad_id)
            tokens[:, t] = tok
            finished |= tok == self.eos_id
            if repetition_penalty != 1.0:
                seen.scatter_(1, tok[:, None], True)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self._step(
                self._embed_tokens(tok[:, None]), full_attn[:, : P + t + 1], next_pos + t, cache
            )
        return tokens, (torch.stack(all_logits, 1) if return_logits else None)

    def beam_search(
        self,
        embeds,
        attn,
        pos,
        beam_size: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ):
        """Beam search; returns the best hypothesis per row ``[B,S]`` (pad after eos) and its score
        ``[B]``.

        Scores are summed log-probabilities; a hypothesis ending in eos after n tokens (eos
        included) scores sum / n**length_penalty. Each step takes the top 2K candidates: eos
        candidates ranked in the top K become finished hypotheses (the best K kept per row), the
        best K non-eos candidates continue. A row is done when it holds K finished hypotheses and
        its best running beam, normalised by its current length, is no better than the worst of them
        (Hugging Face's early_stopping=False). Beams still running at max_new_tokens are finished as
        they are.
        """
        K, S = beam_size, max_new_tokens
        B, P = attn.shape
        dev = embeds.device
        cache = DynamicCache()
        # prefix computed once per row
        logits = self._step(embeds, attn, pos, cache).repeat_interleave(K, 0)
        cache.batch_repeat_interleave(K)
        full_attn = torch.cat([attn, attn.new_ones(B, S)], 1).repeat_interleave(K, 0)
        next_pos = attn.sum(-1, keepdim=True).repeat_interleave(K, 0)
        V = logits.shape[-1]
        neg_inf = float("-inf")
        beam_scores = torch.full((B, K), neg_inf, device=dev)
        beam_scores[:, 0] = 0.0  # all beams start equal: only the first one may expand at step 0
        tokens = torch.full((B * K, S), self.pad_id, dtype=torch.long, device=dev)
        seen = torch.zeros(B * K, V, dtype=torch.bool, device=dev)
        fin_scores = torch.full((B, K), neg_inf, device=dev)
        fin_tokens = torch.full((B, K, S), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        base = torch.arange(B, device=dev)[:, None] * K
        top_rank = torch.arange(2 * K, device=dev) < K
        for t in range(S):
            logp = self._process(logits, seen, t, min_new_tokens, repetition_penalty).log_softmax(
                -1
            )
            cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)
            top_v, top_i = cand.topk(2 * K, dim=1)
            src, tok = top_i // V, top_i % V
            is_eos = tok == self.eos_id
            # eos candidates -> finished hypotheses (keep the best K per row)
            add = is_eos & top_rank & torch.isfinite(top_v) & ~done[:, None]
            new_fin = torch.where(add, top_v / float(t + 1) ** length_penalty, neg_inf)
            cand_seq = tokens.view(B, K, S).gather(1, src[..., None].expand(B, 2 * K, S))
            cand_seq[:, :, t] = tok
            fin_scores, keep = torch.cat([fin_scores, new_fin], 1).topk(K, dim=1)
            fin_tokens = torch.cat([fin_tokens, cand_seq], 1).gather(
                1, keep[..., None].expand(B, K, S)
            )
            # best K non-eos candidates keep running
            beam_scores, sel = top_v.masked_fill(is_eos, neg_inf).topk(K, dim=1)
            sel_tok = tok.gather(1, sel).view(-1)
            flat = (base + src.gather(1, sel)).view(-1)
            tokens = tokens.index_select(0, flat)
            tokens[:, t] = sel_tok
            if repetition_penalty != 1.0:
                seen = seen.index_select(0, flat).scatter_(1, sel_tok[:, None], True)
            best_running = beam_scores[:, 0] / float(t + 1) ** length_penalty
            done |= torch.isfinite(fin_scores[:, -1]) & (best_running <= fin_scores[:, -1])
            if t == S - 1 or bool(done.all()):
                break
            cache.reorder_cache(flat)
            logits = self._step(
                self._embed_tokens(sel_tok[:, None]), full_attn[:, : P + t + 1], next_pos + t, cache
            )
        # rows still open: their running beams finish as they are
        run = torch.where(done[:, None], neg_inf, beam_scores / float(t + 1) ** length_penalty)
        fin_scores, keep = torch.cat([fin_scores, run], 1).topk(K, dim=1)
        fin_tokens = torch.cat([fin_tokens, tokens.view(B, K, S)], 1).gather(
            1, keep[..., None].expand(B, K, S)
        )
        return fin_tokens[:, 0], fin_scores[:, 0]


def build_report_decoder(cfg_decoder, tokenizer, visual_dim: int) -> ReportDecoder:
    """ReportDecoder from ``cfg.model.decoder``: LM from a path or sizes, optional LoRA, optional
    freezing."""
    c = cfg_decoder
    lm = build_lm(
        c.path,
        tokenizer,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_positions=c.n_positions,
        dropout=c.dropout,
    )
    if c.freeze:
        lm.requires_grad_(False)
    if c.lora.enabled:  # LoRA: the base LM is frozen, only the adapters train
        lm = apply_lora(lm, c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules)
    return ReportDecoder(lm, tokenizer, visual_dim, max_report_tokens=c.max_report_tokens)
