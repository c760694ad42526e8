import itertools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.report_decoder import IGNORE, ReportDecoder, build_lm, build_report_decoder
from utils.config import load_config

REPORTS = ["the heart is normal in size. no pleural effusion.",
           "small left pleural effusion with basilar atelectasis.",
           "lungs are clear. no pneumothorax. the cardiac silhouette is enlarged."]
PROMPTS = ["Findings: none.", "Findings: pleural effusion, atelectasis.", "Findings: cardiomegaly."]
VDIM = 24


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


def tiny_decoder(tokenizer=None, seed=0, max_report_tokens=100, lm=None):
    torch.manual_seed(seed)
    tokenizer = tokenizer or byte_bpe()
    lm = lm or build_lm(None, tokenizer, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    return ReportDecoder(lm, tokenizer, VDIM, max_report_tokens).eval()


def visual_inputs(B=3, N=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, VDIM, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, [0, 2]] = False  # leaf tokens switched off for some studies
    if B > 2:
        mask[2, 1] = False
    return visual, mask


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder()


def test_targets_cover_report_and_eos_only(dec):
    visual, mask = visual_inputs()
    p_ids, r_ids = dec.encode(PROMPTS), dec.encode(REPORTS)
    logits, tgt = dec.teacher_forced(visual, mask, p_ids, r_ids)
    assert logits.shape[:2] == tgt.shape and logits.shape[-1] == len(dec.tokenizer)
    for i in range(3):
        row = tgt[i][tgt[i] != IGNORE].tolist()
        assert row == r_ids[i] + [dec.eos_id]
        # the first target sits at the bos position, right after the prompt
        assert tgt[i, len(p_ids[i])].item() == r_ids[i][0]
        assert (tgt[i, :len(p_ids[i])] == IGNORE).all()


def test_training_truncates_report_tokens(dec):
    visual, mask = visual_inputs()
    short = ReportDecoder(dec.lm, dec.tokenizer, VDIM, max_report_tokens=4).eval()
    short.visual_proj.load_state_dict(dec.visual_proj.state_dict())
    r_ids = [r[:4] for r in dec.encode(REPORTS)]
    logits, tgt = dec.teacher_forced(visual, mask, dec.encode(PROMPTS), r_ids)
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


def test_loss_decreases_and_gradients_reach_visual_projection():
    dec = tiny_decoder().train()
    visual, mask = visual_inputs()
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    losses = []
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
        ).train()
        assert dec.lm.config.attn_pdrop == dec.lm.config.resid_pdrop == p
        with torch.no_grad():
            a, b = dec(visual, mask, PROMPTS, REPORTS), dec(visual, mask, PROMPTS, REPORTS)
        assert (a == b) == (p == 0.0), (p, a, b)


def _teacher_forcing_matches_generation(dec):
    visual, mask = visual_inputs(B=2)
    prompts = ["Findings: none.", "Findings: pleural effusion, atelectasis, cardiomegaly."]
    rows = [p + [dec.bos_id] for p in dec.encode(prompts)]
    assert len(rows[0]) != len(rows[1])  # left padding happens
    embeds, attn, pos = dec._inputs(visual, mask, rows, left_pad=True)
    steps = 8
    with torch.no_grad():
        tokens, step_logits = dec.greedy_search(
            embeds, attn, pos, steps, min_new_tokens=steps, return_logits=True
        )
        logits, _ = dec.teacher_forced(visual, mask, dec.encode(prompts), tokens.tolist())
    for i, p in enumerate(dec.encode(prompts)):
        tf = logits[i, len(p):len(p) + steps]  # from the bos position on
        assert torch.allclose(tf, step_logits[i], atol=1e-4), (tf - step_logits[i]).abs().max()


def test_teacher_forcing_equals_generation_gpt2(dec):
    _teacher_forcing_matches_generation(dec)


@pytest.fixture(scope="module")
def llama_dec(tmp_path_factory):
    tokenizer = byte_bpe()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    lm = build_lm(str(path), tokenizer)
    assert isinstance(lm, LlamaForCausalLM)
    return tiny_decoder(tokenizer, lm=lm)


def test_teacher_forcing_equals_generation_llama(llama_dec):
    _teacher_forcing_matches_generation(llama_dec)
    visual, mask = visual_inputs()
    loss = llama_dec(visual, mask, PROMPTS, REPORTS)
    assert torch.isfinite(loss)
    out = llama_dec.generate(visual, mask, PROMPTS, beam_size=3, max_new_tokens=5)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)


@pytest.mark.parametrize("rep", [1.0, 1.3])
def test_beam_one_equals_greedy(rep):
    dec = tiny_decoder(seed=3)
    with torch.no_grad():  # make eos likely so that hypotheses finish at different steps
        dec.lm.get_input_embeddings().weight[dec.eos_id] *= 8
    visual, mask = visual_inputs()
    embeds, attn, pos = dec._inputs(
        visual, mask, [p + [dec.bos_id] for p in dec.encode(PROMPTS)], left_pad=True
    )
    with torch.no_grad():
        greedy, _ = dec.greedy_search(embeds, attn, pos, 12, repetition_penalty=rep)
        beam = dec.beam_search(embeds, attn, pos, 1, 12, repetition_penalty=rep)[0]
    assert torch.equal(greedy, beam)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_brute_force_optimum(length_penalty):
    # vocabulary of 5: beams wide enough to enumerate every sequence
    tok = word_tokenizer(("a", "b"))
    dec = tiny_decoder(tok, seed=0)
    with torch.no_grad():  # a model whose greedy choice is not optimal for length_penalty > 0
        for p in dec.lm.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    V, S = len(tok), 3
    visual, mask = visual_inputs(B=1)
    seqs = [list(s[:n]) for n in range(1, S + 1) for s in itertools.product(range(V), repeat=n)
            if (s[n - 1] == dec.eos_id or n == S) and dec.eos_id not in s[:n - 1]]
    seqs = [list(s) for s in dict.fromkeys(tuple(s) for s in seqs)]
    prompt = dec.encode(["a b"])
    with torch.no_grad():
        report_ids = [s[:-1] if s[-1] == dec.eos_id else s for s in seqs]
        logits, _ = dec.teacher_forced(visual.expand(len(seqs), -1, -1), mask.expand(len(seqs), -1),
                                       prompt * len(seqs), report_ids)
        logp = logits.log_softmax(-1)
    start = len(prompt[0])
    scores = {
        tuple(s): sum(logp[i, start + j, t].item() for j, t in enumerate(s))
        / len(s) ** length_penalty
        for i, s in enumerate(seqs)
    }
    embeds, attn, pos = dec._inputs(visual, mask, [prompt[0] + [dec.bos_id]], left_pad=True)
    with torch.no_grad():
        best, best_score = dec.beam_search(
            embeds, attn, pos, V**S, S, length_penalty=length_penalty
        )
        greedy = dec.greedy_search(embeds, attn, pos, S)[0][0].tolist()
    cut = lambda s: tuple(s[: s.index(dec.eos_id) + 1]) if dec.eos_id in s else tuple(s)  # noqa: E731
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
    kw = dict(beam_size=beam_size, max_new_tokens=10, repetition_penalty=1.2, length_penalty=1.0)
    batch = dec.generate(visual, mask, PROMPTS, **kw)
    single = [
        dec.generate(visual[i : i + 1], mask[i : i + 1], PROMPTS[i : i + 1], **kw)[0]
        for i in range(3)
    ]
    assert batch == single
    assert any(batch)


def _fixed_logits(dec, logits):
    """Replace the LM by constant next-token logits (hand-computable decoding)."""
    dec._step = lambda embeds, attn, pos, cache: logits.expand(embeds.shape[0], -1).clone()


def test_min_new_tokens_blocks_eos_and_eos_finishes(dec):
    d = tiny_decoder(dec.tokenizer)
    V = len(d.tokenizer)
    logits = torch.zeros(V)
    logits[d.eos_id], logits[100] = 5.0, 4.0
    _fixed_logits(d, logits)
    visual, mask = visual_inputs(B=2)
    embeds, attn, pos = d._inputs(visual, mask, [[d.bos_id], [d.bos_id]], left_pad=True)
    for beam in (1, 3):
        search = (lambda **k: d.greedy_search(embeds, attn, pos, **k)[0]) if beam == 1 else \
            (lambda **k: d.beam_search(embeds, attn, pos, beam, **k)[0])
        assert search(max_new_tokens=6)[:, 0].tolist() == [d.eos_id] * 2
        out = search(max_new_tokens=6, min_new_tokens=3)
        assert out[:, :4].tolist() == [[100, 100, 100, d.eos_id]] * 2
        assert (out[:, 4:] == d.pad_id).all()


def test_repetition_penalty_hand_computed(dec):
    d = tiny_decoder(dec.tokenizer)
    V = len(d.tokenizer)
    logits = torch.full((V,), -1.0)
    logits[100], logits[101], logits[d.eos_id] = 2.0, 1.9, -10.0
    _fixed_logits(d, logits)
    visual, mask = visual_inputs(B=1)
    embeds, attn, pos = d._inputs(visual, mask, [[d.bos_id]], left_pad=True)
    tokens = d.greedy_search(embeds, attn, pos, 4, repetition_penalty=1.5)[0][0].tolist()
    # step 0: 100 (2.0); step 1: 100 -> 2/1.5=1.33 < 1.9 -> 101; step 2: 100 (1.33) > 101 (1.27) ->
    # 100 ...
    assert tokens == [100, 101, 100, 100]
    assert d.greedy_search(embeds, attn, pos, 4)[0][0].tolist() == [100] * 4


def test_position_overflow_is_an_error(dec):
    visual, _ = visual_inputs(B=1, N=100)
    mask = torch.ones(1, 100, dtype=torch.bool)
    with pytest.raises(ValueError, match="n_positions"):
        dec.generate(visual, mask, ["Findings: none."], max_new_tokens=40)
    with pytest.raises(ValueError, match="n_positions"):
        dec(visual, mask, ["Findings: none."], [" ".join(REPORTS)])
    mask[:, :60] = False  # masked tokens take no position: this fits
    assert len(dec.generate(visual, mask, ["Findings: none."], max_new_tokens=5)) == 1


def _cfg_decoder(**over):
    cfg = load_config(None)
    d = cfg.model.decoder
    d.update(n_embd=32, n_layer=2, n_head=2, n_positions=128)
    for k, v in over.items():
        if k == "lora":
            d.lora.update(v)
        else:
            d[k] = v
    return d


def test_build_from_config_lm_attribute():
    dec = build_report_decoder(_cfg_decoder(), byte_bpe(), VDIM)
    names = [n for n, _ in dec.named_parameters()]
    assert any(n.startswith("lm.") for n in names) and "visual_proj.weight" in names
    assert dec.lm.config.n_embd == 32 and dec.lm.get_input_embeddings().num_embeddings == len(
        dec.tokenizer
    )


def test_freeze_trains_only_the_projection():
    dec = build_report_decoder(_cfg_decoder(freeze=True), byte_bpe(), VDIM)
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable == {"visual_proj.weight", "visual_proj.bias"}


def test_lora_trains_only_adapters():
    dec = build_report_decoder(
        _cfg_decoder(lora={"enabled": True, "r": 4, "alpha": 8}), byte_bpe(), VDIM
    ).train()
    lm_trainable = [n for n, p in dec.lm.named_parameters() if p.requires_grad]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    before = {n: p.detach().clone() for n, p in dec.lm.named_parameters()}
    opt = torch.optim.SGD([p for p in dec.parameters() if p.requires_grad], lr=0.5)
    visual, mask = visual_inputs()
    for _ in range(2):
        opt.zero_grad()
        dec(visual, mask, PROMPTS, REPORTS).backward()
        opt.step()
    for n, p in dec.lm.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == ("lora_" in n), n
    assert dec.generate(visual, mask, PROMPTS, beam_size=2, max_new_tokens=3)
