import itertools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    RepetitionPenaltyLogitsProcessor,
)

from models.report_decoder import (
    DECODING_KEYS,
    IGNORE,
    ReportDecoder,
    build_lm,
    build_report_decoder,
    decoding_options,
    visual_prefix,
)
from utils.config import load_config

REPORTS = ["the heart is normal in size. no pleural effusion.",
           "small left pleural effusion with basilar atelectasis.",
           "lungs are clear. no pneumothorax. the cardiac silhouette is enlarged."]
PROMPTS = ["Findings: none.", "Findings: pleural effusion, atelectasis.", "Findings: cardiomegaly."]
VDIM = 24
# the official decoding settings (configs/defaults.yaml eval.*)
OFFICIAL = dict(beam_size=3, max_new_tokens=100, min_new_tokens=80, repetition_penalty=2.0,
                length_penalty=2.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast on a busy machine, and its reductions do not
    depend on the batch size (the HF comparisons run HF's prefill on B x beams rows, ours on B)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_bpe(texts=REPORTS + PROMPTS, vocab_size=300):
    """A tiny byte-level BPE with the project's special tokens (as datasets/tokenizer.py's
    train_bpe)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def word_tokenizer(words=("a", "b")):
    """Special tokens + a few words: a vocabulary small enough for brute-force search."""
    vocab = {"<|endoftext|>": 0, "<|bos|>": 1, "<|pad|>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def tiny_decoder(tokenizer=None, seed=0, max_report_tokens=100, lm=None, layout="project",
                 prompt_dropout=0.0):
    torch.manual_seed(seed)
    tokenizer = tokenizer or byte_bpe()
    lm = lm or build_lm(None, tokenizer, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                         dropout=0.0)
    return ReportDecoder(lm, tokenizer, VDIM, max_report_tokens, layout=layout,
                         prompt_dropout=prompt_dropout).eval()


def visual_inputs(B=3, N=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, VDIM, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, [0, 2]] = False  # leaf tokens switched off for some studies
    if B > 2:
        mask[2, 1] = False
    return visual, mask


def prefixes(dec, prompts):
    return [dec.prefix_ids(p) for p in dec.encode(prompts)]


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder()


@pytest.fixture(scope="module")
def official():
    return tiny_decoder(layout="official")


# ---------------------------------------------------------------------------- training
def test_layouts_and_end_tokens(dec, official):
    tok = dec.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and official.end_id == newline[0] != tok.eos_token_id
    assert dec.end_id == tok.eos_token_id
    p = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    # official: prompt + "\n" (nothing when the prompt is left out); project: prompt + bos
    assert official.prefix_ids(p) == p + newline and official.prefix_ids(None) == []
    assert dec.prefix_ids(p) == p + [dec.bos_id] and dec.prefix_ids(None) == [dec.bos_id]
    # generation cuts at the layout's end token
    r = tok(REPORTS[0], add_special_tokens=False)["input_ids"]
    assert official.decode(torch.tensor([r + newline + r])) == [REPORTS[0]]
    assert dec.decode(torch.tensor([r + [dec.end_id] + r])) == [REPORTS[0]]
    with pytest.raises(ValueError, match="end token"):
        official(*visual_inputs(B=1), PROMPTS[:1], ["two lines.\nsecond."])
    with pytest.raises(ValueError, match="layout"):
        ReportDecoder(dec.lm, tok, VDIM, layout="other")


@pytest.mark.parametrize("layout", ["project", "official"])
def test_targets_cover_report_and_end_only(layout):
    d = tiny_decoder(layout=layout)
    visual, mask = visual_inputs()
    r_ids = d.encode(REPORTS)
    logits, tgt = d.teacher_forced(visual, mask, prefixes(d, PROMPTS), r_ids)
    R = max(map(len, r_ids))
    assert logits.shape == (3, R + 1, len(d.tokenizer)) and tgt.shape == (3, R + 1)
    for i in range(3):
        assert tgt[i, :len(r_ids[i]) + 1].tolist() == r_ids[i] + [d.end_id]
        assert (tgt[i, len(r_ids[i]) + 1:] == IGNORE).all()


@pytest.mark.parametrize("layout", ["project", "official"])
@pytest.mark.parametrize("dropped", [(), (1,)])
def test_loss_equals_unpadded_full_sequence_reference(layout, dropped):
    """The loss equals, row by row, the cross-entropy read off the LM run over the row alone,
    unpadded, with logits everywhere: padding, position ids and the target alignment are right,
    also for a row whose prompt is left out (official: the last visual token predicts the first
    report token)."""
    d = tiny_decoder(layout=layout)
    visual, mask = visual_inputs()
    rows = [d.prefix_ids(None if i in dropped else p) for i, p in enumerate(d.encode(PROMPTS))]
    logits, tgt = d.teacher_forced(visual, mask, rows, d.encode(REPORTS))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                             ignore_index=IGNORE)
    if not dropped:
        torch.testing.assert_close(d(visual, mask, PROMPTS, REPORTS), loss)
    total, count = 0.0, 0
    for i, (p, r) in enumerate(zip(rows, d.encode(REPORTS))):
        keep = mask[i]
        vis = d.visual_proj(visual[i, keep])
        ids = torch.tensor(p + r)
        embeds = torch.cat([vis, d.lm.get_input_embeddings()(ids)])[None]
        logits = d.lm(inputs_embeds=embeds).logits[0]  # positions 0..n-1, every logit
        start = vis.shape[0] + len(p) - 1  # the last prefix token predicts the first report token
        target = torch.tensor(r + [d.end_id])
        total += torch.nn.functional.cross_entropy(
            logits[start:start + len(target)], target, reduction="sum"
        )
        count += len(target)
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


def test_lm_head_runs_only_at_target_positions(dec):
    visual, mask = visual_inputs()
    rows = []
    hook = dec.lm.get_output_embeddings().register_forward_hook(
        lambda m, inp, out: rows.append(inp[0].shape[:2])
    )
    try:
        dec(visual, mask, PROMPTS, REPORTS)
    finally:
        hook.remove()
    R = max(map(len, dec.encode(REPORTS)))
    # B x (report tokens + end) - not the 6 visual tokens nor the prompts
    assert rows == [torch.Size([3, R + 1])]


def test_prompt_dropout_draws_per_sample_from_torch():
    d = tiny_decoder(layout="official", prompt_dropout=0.5).train()
    torch.manual_seed(5)
    a = d.keep_prompts(1000)
    torch.manual_seed(5)
    assert d.keep_prompts(1000) == a  # the engine's per-step seed makes it reproducible
    assert 0.45 < sum(a) / 1000 < 0.55 and len(set(a)) == 2
    # the samples' own draws decide when given (utils.seed.sample_noise: rank- and batch-free)
    assert d.keep_prompts(4, torch.tensor([0.1, 0.6, 0.49, 0.5])) == [False, True, False, True]
    # the loss is that of the prompts kept by the draw (dropped: no prompt, no separator)
    visual, mask = visual_inputs()
    torch.manual_seed(11)
    keep = d.keep_prompts(3)
    assert keep != [True] * 3 and any(keep)
    torch.manual_seed(11)
    with torch.no_grad():
        loss = d(visual, mask, PROMPTS, REPORTS)
        logits, tgt = d.teacher_forced(
            visual, mask, [d.prefix_ids(p if k else None) for p, k in zip(d.encode(PROMPTS), keep)],
            d.encode(REPORTS),
        )
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                                 ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected)
    # evaluation keeps every prompt and draws nothing; so does prompt_dropout 0
    always = tiny_decoder(prompt_dropout=0.0).train()
    state = torch.get_rng_state()
    d.eval()(visual, mask, PROMPTS, REPORTS)
    always(visual, mask, PROMPTS, REPORTS)
    assert torch.equal(torch.get_rng_state(), state)


def test_training_truncates_report_tokens(dec):
    visual, mask = visual_inputs()
    short = ReportDecoder(dec.lm, dec.tokenizer, VDIM, max_report_tokens=4, layout="project").eval()
    short.visual_proj.load_state_dict(dec.visual_proj.state_dict())
    r_ids = [r[:4] for r in dec.encode(REPORTS)]
    logits, tgt = dec.teacher_forced(visual, mask, prefixes(dec, PROMPTS), r_ids)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE
    )
    assert torch.allclose(short(visual, mask, PROMPTS, REPORTS), expected, atol=1e-6)
    assert not torch.allclose(dec(visual, mask, PROMPTS, REPORTS), expected, atol=1e-3)


def test_masked_visual_tokens_have_no_influence(dec):
    visual, mask = visual_inputs()
    loss = dec(visual, mask, PROMPTS, REPORTS)
    gen = dec.generate(visual, mask, PROMPTS, max_new_tokens=6)
    noisy = visual.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), VDIM)
    assert torch.equal(dec(noisy, mask, PROMPTS, REPORTS), loss)
    assert dec.generate(noisy, mask, PROMPTS, max_new_tokens=6) == gen
    # and a masked token is the same as a token that is not there at all
    keep = mask[0]
    alone = dec(
        visual[:1, keep], torch.ones(1, int(keep.sum()), dtype=torch.bool), PROMPTS[:1], REPORTS[:1]
    )
    assert torch.allclose(dec(visual[:1], mask[:1], PROMPTS[:1], REPORTS[:1]), alone, atol=1e-5)
    # switching a token on does change the output (the test above can fail)
    assert not torch.allclose(dec(noisy, torch.ones_like(mask), PROMPTS, REPORTS), loss)


def test_visual_prefix_masks_cls_unless_visible():
    B, K, L, D = 2, 4, 3, 5
    leaves, cls, patches = torch.randn(B, K, D), torch.randn(B, D), torch.randn(B, L, D)
    shown = torch.tensor([[True, False, True, False], [False] * 4])
    for visible in (False, True):
        visual, mask = visual_prefix(leaves, cls, patches, shown, cls_visible=visible)
        assert torch.equal(visual, torch.cat([leaves, cls[:, None], patches], 1))
        assert torch.equal(mask[:, :K], shown) and mask[:, K + 1:].all()
        assert mask[:, K].tolist() == [visible] * B


def test_loss_decreases_and_gradients_reach_visual_projection():
    dec = tiny_decoder(layout="official", prompt_dropout=0.5).train()
    visual, mask = visual_inputs()
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    losses = []
    torch.manual_seed(0)
    for _ in range(20):
        loss = dec(visual, mask, PROMPTS, REPORTS)
        opt.zero_grad()
        loss.backward()
        assert dec.visual_proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_option():
    """dropout=0: a training-mode loss is deterministic; the default (GPT-2's 0.1) makes it vary."""
    visual, mask = visual_inputs()
    for p in (0.0, 0.1):
        torch.manual_seed(0)
        tok = byte_bpe()
        dec = ReportDecoder(
            build_lm(None, tok, n_embd=32, n_layer=2, n_head=2, n_positions=128, dropout=p),
            tok,
            VDIM,
            prompt_dropout=0.0,
        ).train()
        assert dec.lm.config.attn_pdrop == dec.lm.config.resid_pdrop == p
        with torch.no_grad():
            a, b = dec(visual, mask, PROMPTS, REPORTS), dec(visual, mask, PROMPTS, REPORTS)
        assert (a == b) == (p == 0.0), (p, a, b)


def test_position_overflow_is_an_error(dec):
    small = tiny_decoder(lm=build_lm(None, dec.tokenizer, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=128))
    visual, _ = visual_inputs(B=1, N=100)
    mask = torch.ones(1, 100, dtype=torch.bool)
    with pytest.raises(ValueError, match="n_positions"):
        small.generate(visual, mask, ["Findings: none."], max_new_tokens=40)
    with pytest.raises(ValueError, match="n_positions"):
        small(visual, mask, ["Findings: none."], [" ".join(REPORTS)])
    mask[:, :60] = False  # masked tokens take no position: this fits
    assert len(small.generate(visual, mask, ["Findings: none."], max_new_tokens=5)) == 1


# ---------------------------------------------------------------------------- decoding
def _teacher_forcing_matches_generation(dec):
    visual, mask = visual_inputs(B=2)
    prompts = ["Findings: none.", "Findings: pleural effusion, atelectasis, cardiomegaly."]
    rows = prefixes(dec, prompts)
    assert len(rows[0]) != len(rows[1])  # left padding happens
    embeds, attn, pos = dec._inputs(visual, mask, rows)
    steps = 8
    with torch.no_grad():
        tokens, step_logits = dec.greedy_search(
            embeds, attn, pos, steps, min_new_tokens=steps, return_logits=True
        )
        logits, _ = dec.teacher_forced(visual, mask, rows, tokens.tolist())
    torch.testing.assert_close(logits[:, :steps], step_logits, atol=1e-4, rtol=1e-4)


def test_teacher_forcing_equals_generation_gpt2(dec, official):
    _teacher_forcing_matches_generation(dec)
    _teacher_forcing_matches_generation(official)


def _save_lm(kind, tokenizer, path, **over):
    """A tiny randomly initialised HF causal LM of family ``kind`` saved to ``path``."""
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sizes.update(over)
    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    model_cls(config_cls(**sizes)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dec(tmp_path_factory):
    tokenizer = byte_bpe()
    lm = build_lm(_save_lm("llama", tokenizer, tmp_path_factory.mktemp("llama")), tokenizer)
    assert isinstance(lm, LlamaForCausalLM)
    return tiny_decoder(tokenizer, lm=lm, layout="official")


def test_teacher_forcing_equals_generation_llama(llama_dec):
    _teacher_forcing_matches_generation(llama_dec)
    visual, mask = visual_inputs()
    assert torch.isfinite(llama_dec(visual, mask, PROMPTS, REPORTS))


def _end_bias(dec, delta):
    """Add ``delta`` to the end token's logit inside the LM (a hook on its head, so that HF's
    generate sees it too): reports end early unless min_new_tokens forbids it."""
    bias = torch.zeros(len(dec.tokenizer))
    bias[dec.end_id] = delta
    return dec.lm.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)


def _hf_generate(dec, embeds, attn, rules, stock_penalty=False):
    """Hugging Face's generate() on the same inputs_embeds / attention_mask (HF derives the same
    position ids from the mask). The repetition penalty goes in as HF's own processor with no
    prompt_ignore_length unless ``stock_penalty``: transformers 5.x otherwise skips, for
    inputs_embeds, the first (leading zeros of the mask) generated tokens of each row."""
    penalty = rules.get("repetition_penalty", 1.0)
    kw = dict(do_sample=False, num_beams=rules.get("beam_size", 1),
              max_new_tokens=rules["max_new_tokens"],
              min_new_tokens=rules.get("min_new_tokens", 0),
              length_penalty=rules.get("length_penalty", 1.0),
              no_repeat_ngram_size=rules.get("no_repeat_ngram_size", 0),
              eos_token_id=dec.end_id, pad_token_id=dec.pad_id, early_stopping=False,
              return_dict_in_generate=True, output_scores=True)
    if stock_penalty:
        kw["repetition_penalty"] = penalty
    elif penalty != 1.0:
        kw["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)])
    with torch.no_grad():
        return dec.lm.generate(inputs_embeds=embeds, attention_mask=attn, **kw)


def _cut(row, end):
    row = list(row)
    return row[: row.index(end) + 1] if end in row else row


def _ours(dec, embeds, attn, pos, rules):
    rules = dict(rules)
    beam, S = rules.pop("beam_size", 1), rules.pop("max_new_tokens")
    with torch.no_grad():
        if beam == 1:
            rules.pop("length_penalty", None)
            return dec.greedy_search(embeds, attn, pos, S, **rules)[0], None
        return dec.beam_search(embeds, attn, pos, beam, S, **rules)


def _equals_hf(dec, visual, mask, prompts, rules, stock_penalty=False):
    embeds, attn, pos = dec._inputs(visual, mask, prefixes(dec, prompts))
    tokens, score = _ours(dec, embeds, attn, pos, rules)
    hf = _hf_generate(dec, embeds, attn, rules, stock_penalty)
    ours = [_cut(r, dec.end_id) for r in tokens.tolist()]
    theirs = [_cut(r, dec.end_id) for r in hf.sequences.tolist()]
    assert ours == theirs
    if score is not None:  # and beam search scores its hypotheses as HF does
        torch.testing.assert_close(score, hf.sequences_scores, atol=1e-4, rtol=1e-5)
    return ours


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_equals_hugging_face_generate(family, beam_size, official, llama_dec):
    """Token for token equal to HF generate() on tiny GPT-2 / Llama: the official settings (min 80
    / max 100 new tokens, repetition 2.0, length 2.0), batches with prompts of different lengths
    (left padding) and masked visual tokens, min-length forcing, and no-repeat n-grams."""
    dec = official if family == "gpt2" else llama_dec
    visual, mask = visual_inputs()
    rules = {**OFFICIAL, "beam_size": beam_size}
    hook = _end_bias(dec, 3.0)
    try:
        free = _equals_hf(dec, visual, mask, PROMPTS, {**rules, "min_new_tokens": 0})
        # the end token comes early without min_new_tokens: the forcing below is exercised
        assert min(len(r) for r in free) < 40 and all(r[-1] == dec.end_id for r in free)
        forced = _equals_hf(dec, visual, mask, PROMPTS, rules)
        assert all(len(r) > 80 for r in forced)
        assert any(r[-1] == dec.end_id for r in forced)
        _equals_hf(dec, visual, mask, PROMPTS, {**rules, "no_repeat_ngram_size": 3,
                                                "min_new_tokens": 20, "max_new_tokens": 40})
        _equals_hf(dec, visual, mask, PROMPTS, {**rules, "length_penalty": 0.5,
                                                "repetition_penalty": 1.3, "min_new_tokens": 10,
                                                "max_new_tokens": 30})
    finally:
        hook.remove()


def test_stock_hf_repetition_penalty_without_leading_padding(official):
    """With no leading zero in the attention mask, HF's own repetition_penalty= path is ours."""
    visual, mask = visual_inputs()
    mask[:, 0] = True
    prompts = ["Findings: none."] * 3
    for beam_size in (1, 3):
        rules = {**OFFICIAL, "beam_size": beam_size, "min_new_tokens": 10, "max_new_tokens": 30}
        out = _equals_hf(official, visual, mask, prompts, rules, stock_penalty=True)
        assert len({tuple(r) for r in out}) > 1


@pytest.mark.parametrize("ngram", [0, 2])
def test_beam_one_equals_greedy(ngram):
    """Without a repetition penalty (which HF applies to logits in greedy search, to
    log-probabilities in beam search) one beam is greedy search."""
    dec = tiny_decoder(seed=3)
    with torch.no_grad():  # make eos likely so that hypotheses finish at different steps
        dec.lm.get_input_embeddings().weight[dec.end_id] *= 8
    visual, mask = visual_inputs()
    embeds, attn, pos = dec._inputs(visual, mask, prefixes(dec, PROMPTS))
    with torch.no_grad():
        greedy, _ = dec.greedy_search(embeds, attn, pos, 12, min_new_tokens=2,
                                      no_repeat_ngram_size=ngram)
        beam = dec.beam_search(embeds, attn, pos, 1, 12, min_new_tokens=2,
                               no_repeat_ngram_size=ngram)[0]
    assert torch.equal(greedy, beam)
    assert (greedy == dec.end_id).any(1).tolist().count(True) >= 1


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_brute_force_optimum(length_penalty):
    # vocabulary of 5: beams wide enough to enumerate every sequence
    tok = word_tokenizer(("a", "b"))
    dec = tiny_decoder(tok, seed=2)
    with torch.no_grad():  # a model whose greedy choice is not optimal for length_penalty > 0
        for p in dec.lm.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    V, S = len(tok), 3
    visual, mask = visual_inputs(B=1)
    seqs = [list(s[:n]) for n in range(1, S + 1) for s in itertools.product(range(V), repeat=n)
            if (s[n - 1] == dec.end_id or n == S) and dec.end_id not in s[:n - 1]]
    seqs = [list(s) for s in dict.fromkeys(tuple(s) for s in seqs)]
    prefix = prefixes(dec, ["a b"])
    with torch.no_grad():
        report_ids = [s[:-1] if s[-1] == dec.end_id else s for s in seqs]
        logits, _ = dec.teacher_forced(visual.expand(len(seqs), -1, -1), mask.expand(len(seqs), -1),
                                       prefix * len(seqs), report_ids)
        logp = logits.log_softmax(-1)
    scores = {
        tuple(s): sum(logp[i, j, t].item() for j, t in enumerate(s)) / len(s) ** length_penalty
        for i, s in enumerate(seqs)
    }
    embeds, attn, pos = dec._inputs(visual, mask, prefix)
    with torch.no_grad():
        best, best_score = dec.beam_search(
            embeds, attn, pos, V**S, S, length_penalty=length_penalty
        )
        greedy = dec.greedy_search(embeds, attn, pos, S)[0][0].tolist()
    cut = lambda s: tuple(_cut(s, dec.end_id))  # noqa: E731
    best = best[0].tolist()
    assert scores[cut(best)] == pytest.approx(max(scores.values()), abs=1e-5)
    # the beam's own score is right
    assert best_score.item() == pytest.approx(scores[cut(best)], abs=1e-5)
    # beam search does better than greedy here (needs a correctly reordered cache)
    if length_penalty > 0:
        assert scores[cut(best)] > scores[cut(greedy)] + 1e-3
    assert scores[cut(best)] >= scores[cut(greedy)] - 1e-6


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batch_equals_single(dec, beam_size):
    visual, mask = visual_inputs()
    kw = dict(beam_size=beam_size, max_new_tokens=10, repetition_penalty=1.2, length_penalty=1.0,
              no_repeat_ngram_size=2)
    batch = dec.generate(visual, mask, PROMPTS, **kw)
    single = [
        dec.generate(visual[i : i + 1], mask[i : i + 1], PROMPTS[i : i + 1], **kw)[0]
        for i in range(3)
    ]
    assert batch == single
    assert any(batch)


def _fixed_logits(dec, logits):
    """Replace the LM by constant next-token logits (hand-computable decoding)."""
    def fixed(cache, attn, pos, embeds=None, ids=None):
        return logits.expand(attn.shape[0], -1).clone()
    dec._logits = fixed


def test_min_new_tokens_blocks_end_and_end_finishes(dec):
    d = tiny_decoder(dec.tokenizer)
    V = len(d.tokenizer)
    logits = torch.zeros(V)
    logits[d.end_id], logits[100] = 5.0, 4.0
    _fixed_logits(d, logits)
    visual, mask = visual_inputs(B=2)
    embeds, attn, pos = d._inputs(visual, mask, [[d.bos_id], [d.bos_id]])
    for beam in (1, 3):
        search = (lambda **k: d.greedy_search(embeds, attn, pos, **k)[0]) if beam == 1 else \
            (lambda **k: d.beam_search(embeds, attn, pos, beam, **k)[0])
        assert search(max_new_tokens=6)[:, 0].tolist() == [d.end_id] * 2
        out = search(max_new_tokens=6, min_new_tokens=3)
        assert out[:, :4].tolist() == [[100, 100, 100, d.end_id]] * 2
        assert (out[:, 4:] == d.pad_id).all()


def test_repetition_penalty_hand_computed(dec):
    d = tiny_decoder(dec.tokenizer)
    V = len(d.tokenizer)
    logits = torch.full((V,), -1.0)
    logits[100], logits[101], logits[d.end_id] = 2.0, 1.9, -10.0
    _fixed_logits(d, logits)
    visual, mask = visual_inputs(B=1)
    embeds, attn, pos = d._inputs(visual, mask, [[d.bos_id]])
    tokens = d.greedy_search(embeds, attn, pos, 4, repetition_penalty=1.5)[0][0].tolist()
    # step 0: 100 (2.0); step 1: 100 -> 2/1.5=1.33 < 1.9 -> 101; step 2: 100 (1.33) > 101 (1.27) ->
    # 100 ...
    assert tokens == [100, 101, 100, 100]
    assert d.greedy_search(embeds, attn, pos, 4)[0][0].tolist() == [100] * 4


def test_no_repeat_ngram_hand_computed(dec):
    d = tiny_decoder(dec.tokenizer)
    V = len(d.tokenizer)
    logits = torch.full((V,), -5.0)
    logits[100], logits[101], logits[102], logits[d.end_id] = 3.0, 2.0, 1.0, -9.0
    _fixed_logits(d, logits)
    visual, mask = visual_inputs(B=1)
    embeds, attn, pos = d._inputs(visual, mask, [[d.bos_id]])

    def greedy(n):
        return d.greedy_search(embeds, attn, pos, 6, no_repeat_ngram_size=n)[0][0].tolist()

    assert greedy(0) == [100] * 6
    # n=1: no token twice; n=2: "100 100" once, then "100 101", "101 100" is new, ...
    assert greedy(1)[:3] == [100, 101, 102] and len(set(greedy(1))) == 6
    assert greedy(2) == [100, 100, 101, 100, 102, 100]
    assert greedy(3) == [100, 100, 100, 101, 100, 100]


# ---------------------------------------------------------------------------- configuration
def _cfg_decoder(*sets):
    cfg = load_config(None, ["model.decoder.n_embd=32", "model.decoder.n_layer=2",
                             "model.decoder.n_head=2", "model.decoder.n_positions=128", *sets])
    return cfg.model.decoder


def test_defaults_are_the_official_forms():
    cfg = load_config(None)
    d, e = cfg.model.decoder, cfg.eval
    assert (d.layout, d.prompt_dropout, d.cls_visible, d.lr_scale) == ("official", 0.5, False, 0.25)
    assert decoding_options(e) == {**OFFICIAL, "no_repeat_ngram_size": 0}
    assert set(decoding_options(e)) == set(DECODING_KEYS)
    dec = build_report_decoder(d, byte_bpe(), VDIM)
    assert (dec.layout, dec.prompt_dropout, dec.cls_visible) == ("official", 0.5, False)


def test_build_from_config_lm_attribute():
    dec = build_report_decoder(_cfg_decoder(), byte_bpe(), VDIM)
    names = [n for n, _ in dec.named_parameters()]
    assert any(n.startswith("lm.") for n in names) and "visual_proj.weight" in names
    assert dec.lm.config.n_embd == 32 and dec.lm.get_input_embeddings().num_embeddings == len(
        dec.tokenizer
    )


def test_freeze_trains_only_the_projection():
    dec = build_report_decoder(_cfg_decoder("model.decoder.freeze=true"), byte_bpe(), VDIM)
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable == {"visual_proj.weight", "visual_proj.bias"}


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """Tiny saved LMs of three families, each with the tokenizer it was built for."""
    tokenizer = byte_bpe()
    root = tmp_path_factory.mktemp("lms")
    gpt2 = build_lm(None, tokenizer, n_embd=32, n_layer=2, n_head=2, n_positions=256)
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return {"gpt2": str(root / "gpt2"), "llama": _save_lm("llama", tokenizer, root / "llama"),
            "qwen2": _save_lm("qwen2", tokenizer, root / "qwen2")}


FAMILY_TARGETS = {"gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_local_lm_folders_train_and_generate_with_family_lora(family, lm_folders):
    tokenizer = byte_bpe()
    cfg = _cfg_decoder(f"model.decoder.path={lm_folders[family]}", "model.decoder.lora.enabled=true",
                       "model.decoder.lora.r=4")
    dec = build_report_decoder(cfg, tokenizer, VDIM).train()
    assert dec.lm.get_base_model().config.model_type == family
    adapted = {n.split(".")[-4] for n, _ in dec.lm.named_parameters() if "lora_A" in n}
    assert adapted == FAMILY_TARGETS[family]
    assert all(("lora_" in n) == p.requires_grad for n, p in dec.lm.named_parameters())
    visual, mask = visual_inputs()
    torch.manual_seed(0)
    loss = dec(visual, mask, PROMPTS, REPORTS)
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in dec.lm.named_parameters()
        if "lora_B" in n
    )
    out = dec.eval().generate(visual, mask, PROMPTS, beam_size=2, max_new_tokens=4)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    # the targets can be chosen; a name the family does not have is an error naming it
    over = _cfg_decoder(f"model.decoder.path={lm_folders[family]}", "model.decoder.lora.enabled=true",
                        "model.decoder.lora.target_modules=[" +
                        ("c_fc" if family == "gpt2" else "o_proj") + "]")
    dec = build_report_decoder(over, tokenizer, VDIM)
    assert {n.split(".")[-4] for n, _ in dec.lm.named_parameters() if "lora_A" in n} == {
        "c_fc" if family == "gpt2" else "o_proj"}
    wrong = _cfg_decoder(f"model.decoder.path={lm_folders[family]}",
                         "model.decoder.lora.enabled=true",
                         "model.decoder.lora.target_modules=[" +
                         ("q_proj" if family == "gpt2" else "c_attn") + "]")
    with pytest.raises(ValueError, match="do not exist"):
        build_report_decoder(wrong, tokenizer, VDIM)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_bf16_weights(family, lm_folders):
    cfg = _cfg_decoder(f"model.decoder.path={lm_folders[family]}", "model.decoder.dtype=bf16")
    dec = build_report_decoder(cfg, byte_bpe(), VDIM).train()
    assert {p.dtype for p in dec.parameters()} == {torch.bfloat16}
    visual, mask = visual_inputs()  # fp32 features from the image side
    loss = dec(visual, mask, PROMPTS, REPORTS)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert dec.visual_proj.weight.grad.dtype == torch.bfloat16
    assert len(dec.eval().generate(visual, mask, PROMPTS, beam_size=2, max_new_tokens=3)) == 3
    with pytest.raises(ValueError, match="dtype"):
        build_report_decoder(_cfg_decoder("model.decoder.dtype=fp8"), byte_bpe(), VDIM)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients(family, lm_folders):
    grads, calls = {}, {}
    for ckpt in (False, True):
        cfg = _cfg_decoder(f"model.decoder.path={lm_folders[family]}",
                           f"model.decoder.gradient_checkpointing={str(ckpt).lower()}",
                           "model.decoder.prompt_dropout=0.0")
        torch.manual_seed(0)
        dec = build_report_decoder(cfg, byte_bpe(), VDIM).train()
        for m in dec.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        # the first module inside the first block (transformers checkpoints a block's forward)
        inner = next(iter(dec.fsdp_units()[0].children()))
        count = []
        inner.register_forward_hook(lambda *a: count.append(1))
        visual, mask = visual_inputs()
        dec(visual, mask, PROMPTS, REPORTS).backward()
        calls[ckpt] = len(count)
        grads[ckpt] = {n: p.grad for n, p in dec.named_parameters()}
    assert calls == {False: 1, True: 2}  # the block ran again in backward
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, msg=n)


def test_fsdp_units_are_the_blocks_then_the_decoder(lm_folders):
    for family, block in (("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")):
        for lora in ("false", "true"):
            cfg = _cfg_decoder(f"model.decoder.path={lm_folders[family]}",
                               f"model.decoder.lora.enabled={lora}")
            dec = build_report_decoder(cfg, byte_bpe(), VDIM)
            units = dec.fsdp_units()
            assert [type(u).__name__ for u in units] == [block, block, "ReportDecoder"]
