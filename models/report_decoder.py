"""Report generation: a causal LM that reads a projected visual prefix and an entity prompt.

One row, left padded in front so that every row's text starts in the same column:
  [pad ...][visual N][prompt text][report ...][pad ...]
N visual tokens = [25 leaf tokens, CLS, patches]; padding and masked-out visual tokens (anatomies
the study does not concern; CLS in the official form) get attention_mask 0, and position ids are
Hugging Face's: cumsum(attention_mask) - 1 (0 where masked), so a masked token has no influence
and a row reads exactly as if it had never been there. The last visual token must be visible (the
patches always are): it predicts the first report token when a row has no prompt text.

Text layouts (``layout``):
  official  [prompt "\\n"] [report] "\\n"   the end token is "\\n" (GPT-2 style, no bos)
  project   [prompt] <bos> [report] <eos>
In training the prompt is left out per sample with probability ``prompt_dropout`` (official 0.5;
drawn from torch's global RNG, which the engine reseeds per step); the loss is the cross-entropy
over the report tokens and the end token only, and the LM head runs only at those positions
(``logits_to_keep``: the report columns, never the visual prefix or the prompt).

Decoding reproduces Hugging Face ``generate()`` (transformers 5.x) token for token - greedy
``_sample`` and ``_beam_search`` with ``early_stopping=False`` - for ``max_new_tokens``,
``min_new_tokens``, ``repetition_penalty``, ``length_penalty`` and ``no_repeat_ngram_size``,
with the prefix given as ``inputs_embeds`` (so the penalties see the generated tokens only). It is
a hand-written loop over one KV cache (DynamicCache): the prefix is computed once per row and
beam search is tensorised over the batch and the beams. Two differences from calling HF, both
deliberate: the repetition penalty counts every generated token (transformers 5.x skips the first
``left-padding`` generated tokens of a row whose attention mask starts with zeros, which makes a
row's output depend on its batch), and lengths count new tokens only (HF's ``max_length`` /
``min_length`` also count the ``inputs_embeds``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

IGNORE = -100
LAYOUTS = ("official", "project")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OFFICIAL_END = "\n"
NEG = -1.0e9  # Hugging Face beam search's "impossible" score offset
DECODING_KEYS = (
    "beam_size",
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
)


def decoding_options(eval_cfg) -> dict:
    """``ReportDecoder.generate``'s options from ``cfg.eval``."""
    return {k: eval_cfg[k] for k in DECODING_KEYS}


def visual_prefix(leaf_tokens: torch.Tensor, cls: torch.Tensor, patches: torch.Tensor,
                  leaves_shown: torch.Tensor, *, cls_visible: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's visual tokens [B, K + 1 + L, D] = [leaf tokens, CLS, patches] and their attention
    mask [B, K + 1 + L]: a leaf token only where ``leaves_shown`` [B, K] says so, CLS only when
    ``cls_visible`` (official: masked), patches always."""
    visual = torch.cat([leaf_tokens, cls[:, None], patches], dim=1)
    B = leaves_shown.shape[0]
    cls_on = leaves_shown.new_full((B, 1), cls_visible, dtype=torch.bool)
    patches_on = leaves_shown.new_ones(B, patches.shape[1], dtype=torch.bool)
    return visual, torch.cat([leaves_shown.bool(), cls_on, patches_on], dim=1)


def build_lm(path: str | None, tokenizer, n_embd: int = 768, n_layer: int = 12, n_head: int = 12,
             n_positions: int = 512, dropout: float = 0.1,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face causal LM from a local folder (any architecture, its own dropout), loaded in
    ``dtype``, or a fresh GPT-2 of the given size with ``dropout`` on embeddings, residuals and
    attention (GPT-2's 0.1). The embeddings grow to the tokenizer when it is larger."""
    ids = _special_ids(tokenizer)
    if path:
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            n_positions=n_positions, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                            pad_token_id=ids["pad"], resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        lm = GPT2LMHeadModel(config).to(dtype)
    lm.config.pad_token_id = ids["pad"]
    return lm


def lora_targets(lm: nn.Module, target_modules) -> list[str]:
    """The LoRA target modules: ``target_modules``, or for ``[auto]`` (or none) peft's default for
    the LM's family (``config.model_type``: gpt2 -> c_attn; llama, qwen2, mistral ... -> q_proj,
    v_proj). Every name must match a module of ``lm``."""
    family = lm.config.model_type
    targets = list(target_modules or ["auto"])
    if targets == ["auto"]:
        if family not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError(f"LoRA: no default target modules for the LM family {family!r}; "
                             f"set model.decoder.lora.target_modules")
        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family])
    names = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA: target modules {missing} do not exist in the {family} LM "
                         f"(model.decoder.lora.target_modules)")
    return targets


def apply_lora(lm: nn.Module, r: int, alpha: int, dropout: float, target_modules) -> nn.Module:
    """Wrap ``lm`` with peft LoRA adapters on ``target_modules`` (``[auto]``: the family's
    defaults, ``lora_targets``); only the adapters train (peft freezes the base model)."""
    targets = lora_targets(lm, target_modules)
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets
                 for n, m in lm.named_modules())  # GPT-2 stores its linear layers transposed
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=conv1d)
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
    visual prefix. ``layout``, ``prompt_dropout`` and ``cls_visible`` as in the module docstring
    (``cls_visible`` is read by whoever builds the prefix, ``visual_prefix``)."""

    def __init__(self, lm: nn.Module, tokenizer, visual_dim: int, max_report_tokens: int = 100,
                 layout: str = "official", prompt_dropout: float = 0.5, cls_visible: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"model.decoder.layout must be one of {LAYOUTS}, got {layout!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"model.decoder.prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_report_tokens = max_report_tokens
        self.layout, self.prompt_dropout, self.cls_visible = layout, prompt_dropout, cls_visible
        ids = _special_ids(tokenizer)
        self.bos_id, self.pad_id = ids["bos"], ids["pad"]
        self.end_id = ids["eos"] if layout == "project" else self._single_token(OFFICIAL_END)
        hidden = lm.get_input_embeddings().embedding_dim
        self.visual_proj = nn.Linear(visual_dim, hidden)
        # absolute-position LMs only (GPT-2)
        self.max_positions = getattr(lm.config, "n_positions", None)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"report decoder: layout 'official' ends a report with {text!r}, which "
                             f"this tokenizer encodes as {ids}, not one token "
                             f"(use model.decoder.layout: project)")
        return ids[0]

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP units, innermost first: the LM's blocks (its ``_no_split_modules`` classes), then
        this decoder (embeddings, final norm, head, visual projection: everything its ``forward``
        uses outside the blocks)."""
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        block_types = set(getattr(base, "_no_split_modules", None) or ())
        return [m for m in self.lm.modules() if type(m).__name__ in block_types] + [self]

    # ---------------------------------------------------------------- inputs
    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def prefix_ids(self, prompt_ids: list[int] | None) -> list[int]:
        """The text between the visual prefix and the report: the prompt (None: left out) and its
        separator (official: "\\n" after a prompt; project: bos, always)."""
        if self.layout == "official":
            return [] if prompt_ids is None else prompt_ids + [self.end_id]
        return (prompt_ids or []) + [self.bos_id]

    def keep_prompts(self, n: int, draws: torch.Tensor | None = None) -> list[bool]:
        """Training: which of ``n`` samples keep their prompt, P(keep) = 1 - prompt_dropout, from
        ``draws`` [n] uniform in [0, 1) (the samples' own, utils.seed.sample_noise) or else one
        draw per sample from torch's global (CPU) generator. No draw when it is 0."""
        if self.prompt_dropout <= 0.0:
            return [True] * n
        draws = torch.rand(n) if draws is None else draws.float().cpu()
        return (draws >= self.prompt_dropout).tolist()

    def _inputs(self, visual, visual_mask, prefix_rows: list[list[int]],
                report_rows: list[list[int]] | None = None):
        """Embeddings [B, W, H], attention mask [B, W] and position ids [B, W] of
        [pad][visual][prefix text] (left padded) + [report][pad] (right padded, when given)."""
        dev, (B, N) = visual.device, visual.shape[:2]
        T = max(len(r) for r in prefix_rows)
        R = max((len(r) for r in report_rows), default=0) if report_rows is not None else 0
        W = T + N + R
        ids = torch.full((B, W), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, W, dtype=torch.long)
        is_visual = torch.zeros(B, W, dtype=torch.bool)
        for i, p in enumerate(prefix_rows):
            start = T - len(p)
            is_visual[i, start:start + N] = True
            ids[i, T + N - len(p):T + N] = torch.tensor(p, dtype=torch.long)
            mask[i, T + N - len(p):T + N] = 1
            if report_rows is not None:
                r = report_rows[i]
                ids[i, T + N:T + N + len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, T + N:T + N + len(r)] = 1
        ids, mask, is_visual = ids.to(dev), mask.to(dev), is_visual.to(dev)
        tok = self.lm.get_input_embeddings()(ids)
        vis = self.visual_proj(visual.to(self.visual_proj.weight.dtype)).to(tok.dtype)
        embeds = tok.masked_scatter(is_visual[..., None], vis)
        attn = mask.masked_scatter(is_visual, visual_mask.to(dev, torch.long))
        pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
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
    def teacher_forced(self, visual, visual_mask, prefix_rows: list[list[int]],
                       report_ids: list[list[int]]):
        """Logits ``[B, R + 1, V]`` and targets ``[B, R + 1]`` (R = the longest report): column j
        predicts report token j (column R the end token of the longest); IGNORE past a row's
        end token. The LM head runs on these R + 1 columns only (``logits_to_keep``)."""
        R = max(len(r) for r in report_ids)
        embeds, attn, pos = self._inputs(visual, visual_mask, prefix_rows, report_ids)
        self._check_positions(attn)
        tgt = torch.full((len(report_ids), R + 1), IGNORE, dtype=torch.long)
        for i, r in enumerate(report_ids):
            tgt[i, :len(r) + 1] = torch.tensor(r + [self.end_id], dtype=torch.long)
        out = self.lm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=False,
                      logits_to_keep=R + 1)
        return out.logits, tgt.to(visual.device)

    def report_ids(self, reports: list[str]) -> list[list[int]]:
        """Report tokens, truncated to ``max_report_tokens`` (the end token comes after)."""
        rows = [r[:self.max_report_tokens] for r in self.encode(reports)]
        if any(self.end_id in r for r in rows):
            raise ValueError(f"report decoder: a report contains the end token "
                             f"{self.tokenizer.decode([self.end_id])!r} (clean the reports)")
        return rows

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor, prompts: list[str],
                reports: list[str], draws: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the report tokens and their end tokens. In training each
        prompt is left out with probability ``prompt_dropout`` (``keep_prompts(n, draws)``)."""
        keep = self.keep_prompts(len(prompts), draws) if self.training else [True] * len(prompts)
        prefix = [self.prefix_ids(p if k else None) for p, k in zip(self.encode(prompts), keep)]
        logits, tgt = self.teacher_forced(visual, visual_mask, prefix, self.report_ids(reports))
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        prompts: list[str] | None,
        beam_size: int = 1,
        max_new_tokens: int = 100,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ) -> list[str]:
        """Greedy (``beam_size`` 1) or beam search from [visual][prompt + separator] (``prompts``
        None: no prompt); returns the decoded reports, cut at the end token, special tokens
        dropped."""
        if max_new_tokens <= 0:
            return [""] * visual.shape[0]
        prompt_ids = self.encode(prompts) if prompts is not None else [None] * visual.shape[0]
        embeds, attn, pos = self._inputs(visual, visual_mask, [self.prefix_ids(p) for p in prompt_ids])
        self._check_positions(attn, max_new_tokens)
        rules = dict(min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                     no_repeat_ngram_size=no_repeat_ngram_size)
        if beam_size <= 1:
            tokens, _ = self.greedy_search(embeds, attn, pos, max_new_tokens, **rules)
        else:
            tokens, _ = self.beam_search(embeds, attn, pos, beam_size, max_new_tokens,
                                         length_penalty=length_penalty, **rules)
        return self.decode(tokens)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token rows -> text, cut at the first end token."""
        out = []
        for row in tokens.tolist():
            if self.end_id in row:
                row = row[:row.index(self.end_id)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    def _logits(self, cache, attn, pos, embeds=None, ids=None) -> torch.Tensor:
        """Next-token logits [B, V] (float32) of the prefix (``embeds``) or of one new token per
        row (``ids`` [B, 1]), extending ``cache``."""
        out = self.lm(input_ids=ids, inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                      cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _process(self, scores, history, min_new_tokens: int, repetition_penalty: float,
                 no_repeat_ngram_size: int):
        """Hugging Face's logits processors in its order - repetition penalty, no-repeat n-gram,
        min new tokens - on ``scores`` [N, V] given the tokens generated so far ``history``
        [N, t]: a token already generated has its score divided by the penalty (multiplied when
        negative); a token that would repeat an n-gram of the history, or the end token before
        ``min_new_tokens`` tokens, gets -inf."""
        t, V = history.shape[1], scores.shape[-1]
        if repetition_penalty != 1.0 and t > 0:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
            penalised = torch.where(scores < 0, scores * repetition_penalty,
                                    scores / repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        n = no_repeat_ngram_size
        if n > 0 and t >= n:
            windows = history.unfold(1, n, 1)  # [N, t - n + 1, n]: every n-gram so far
            # an n-gram whose first n-1 tokens are the last n-1 generated bans its last token
            match = (windows[..., :-1] == history[:, None, t - n + 1:]).all(-1)
            spare = torch.full_like(windows[..., -1], V)
            banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
            banned.scatter_(1, torch.where(match, windows[..., -1], spare), True)
            scores = scores.masked_fill(banned[:, :V], float("-inf"))
        if t < min_new_tokens:
            scores = scores.clone()
            scores[:, self.end_id] = float("-inf")
        return scores

    def greedy_search(self, embeds, attn, pos, max_new_tokens: int, min_new_tokens: int = 0,
                      repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                      return_logits: bool = False):
        """Greedy decoding from a prefix (HF ``_sample`` without sampling). Returns tokens
        ``[B, S]`` (pad after the end token) and, if asked, the raw per-step logits ``[B, S, V]``
        (before the processors)."""
        B, P = attn.shape
        cache = DynamicCache()
        logits = self._logits(cache, attn, pos, embeds=embeds)
        full_attn = torch.cat([attn, attn.new_ones(B, max_new_tokens)], 1)
        next_pos = attn.sum(-1, keepdim=True)
        tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=attn.device)
        running = torch.ones(B, dtype=torch.bool, device=attn.device)
        all_logits = []
        for t in range(max_new_tokens):
            if return_logits:
                all_logits.append(logits)
            scores = self._process(logits, tokens[:, :t], min_new_tokens, repetition_penalty,
                                   no_repeat_ngram_size)
            tok = torch.where(running, scores.argmax(-1), self.pad_id)
            tokens[:, t] = tok
            running &= tok != self.end_id
            if t == max_new_tokens - 1 or not bool(running.any()):
                break
            logits = self._logits(cache, full_attn[:, :P + t + 1], next_pos + t, ids=tok[:, None])
        return tokens, (torch.stack(all_logits, 1) if return_logits else None)

    def beam_search(self, embeds, attn, pos, beam_size: int, max_new_tokens: int,
                    min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                    length_penalty: float = 1.0, no_repeat_ngram_size: int = 0):
        """Beam search as Hugging Face's ``_beam_search`` with ``early_stopping=False``; returns
        the best hypothesis per row ``[B, S]`` (pad after the end token) and its score ``[B]``.

        K beams; the processors act on the log-probabilities, which add up to a beam's score.
        Each step ranks the top 2K candidates: those that end (end token, or the last allowed
        step) and rank in the top K become finished hypotheses scored sum / n**length_penalty
        (n = generated tokens, the end token included; the best K kept per row); the best K that
        do not end keep running. A row stops adding hypotheses once it holds K and its best
        running beam, normalised by its current length, is no better than the worst of them; the
        search stops when every row has, or at ``max_new_tokens``. Impossible scores are offset
        by -1e9 as in HF (this is what makes tie-breaking identical).
        """
        K, S = beam_size, max_new_tokens
        B, P = attn.shape
        dev = attn.device
        cache = DynamicCache()
        logits = self._logits(cache, attn, pos, embeds=embeds).repeat_interleave(K, 0)
        cache.batch_repeat_interleave(K)  # the prefix is computed once per row
        full_attn = torch.cat([attn, attn.new_ones(B, S)], 1).repeat_interleave(K, 0)
        next_pos = attn.sum(-1, keepdim=True).repeat_interleave(K, 0)
        V = logits.shape[-1]
        run_seq = torch.full((B, K, S), self.pad_id, dtype=torch.long, device=dev)
        run_score = torch.zeros(B, K, device=dev)
        run_score[:, 1:] = NEG  # all beams start equal: only the first one expands at step 0
        fin_seq, fin_score = run_seq.clone(), torch.full((B, K), NEG, device=dev)
        fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        top_k = torch.arange(2 * K, device=dev) < K
        row_base = torch.arange(B, device=dev)[:, None] * K

        def pick(x, idx):  # x [B, M, ...] at beam indices idx [B, M']
            return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(
                *idx.shape, *x.shape[2:]))

        for t in range(S):
            logp = self._process(logits.log_softmax(-1), run_seq.view(B * K, S)[:, :t],
                                 min_new_tokens, repetition_penalty, no_repeat_ngram_size)
            cand = (logp.view(B, K, V) + run_score[..., None]).view(B, K * V)
            top_v, top_i = cand.topk(2 * K, dim=1)
            src, tok = top_i // V, top_i % V
            cand_seq = pick(run_seq, src)
            cand_seq[:, :, t] = tok
            ends = (tok == self.end_id) | (t + 1 >= S)
            # the best K candidates that do not end keep running
            live = top_v + ends.float() * NEG
            keep = live.topk(K, dim=1)[1]
            run_seq, run_score, run_src = pick(cand_seq, keep), pick(live, keep), pick(src, keep)
            # candidates that end in the top K become finished hypotheses
            just = ends & top_k
            scored = top_v / ((t + 1) ** length_penalty)
            scored = scored + (~improvable).float() * NEG + (~just).float() * NEG
            merged = torch.cat([fin_score, scored], 1)
            best = merged.topk(K, dim=1)[1]
            fin_seq = pick(torch.cat([fin_seq, cand_seq], 1), best)
            fin_score = pick(merged, best)
            fin_done = pick(torch.cat([fin_done, just], 1), best)
            # can a running beam still beat the worst finished hypothesis?
            best_running = run_score[:, :1] / ((t + 1) ** length_penalty)
            worst = torch.where(fin_done, fin_score.min(1, keepdim=True)[0], NEG)
            improvable &= (best_running > worst).any(-1, keepdim=True)
            if t == S - 1 or not bool(improvable.any()):
                break
            cache.reorder_cache((row_base + run_src).view(-1))
            logits = self._logits(cache, full_attn[:, :P + t + 1], next_pos + t,
                                  ids=run_seq[:, :, t].reshape(-1, 1))
        return fin_seq[:, 0], fin_score[:, 0]


def build_report_decoder(cfg_decoder, tokenizer, visual_dim: int) -> ReportDecoder:
    """ReportDecoder from ``cfg.model.decoder``: LM from a path or sizes in ``dtype``, optional
    gradient checkpointing, freezing and LoRA (targets per LM family unless configured)."""
    c = cfg_decoder
    if c.dtype not in DTYPES:
        raise ValueError(f"model.decoder.dtype must be one of {list(DTYPES)}, got {c.dtype!r}")
    dtype = DTYPES[c.dtype]
    lm = build_lm(c.path, tokenizer, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  n_positions=c.n_positions, dropout=c.dropout, dtype=dtype)
    if c.gradient_checkpointing:  # recompute each block in backward instead of storing it
        if hasattr(lm, "activation_checkpointing_enable"):  # its name from transformers 5.2x
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.freeze:
        lm.requires_grad_(False)
    if c.lora.enabled:  # LoRA: the base LM is frozen, only the adapters train
        lm = apply_lora(lm, c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules)
    decoder = ReportDecoder(lm, tokenizer, visual_dim, max_report_tokens=c.max_report_tokens,
                            layout=c.layout, prompt_dropout=c.prompt_dropout,
                            cls_visible=c.cls_visible)
    return decoder.to(dtype)  # one dtype throughout (FSDP reduces one gradient dtype per unit)
