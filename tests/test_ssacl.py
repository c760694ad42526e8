import numpy as np
import pytest
import torch

from datasets.synthetic import render_study
from datasets.tokenizer import tokenizer_files, train_bpe, train_wordpiece
from models.ssacl import SSACL
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config import load_config
from utils.lr_sched import param_groups
from vocab.anatomy_graph import AnatomyGraph
from vocab.observations import CHEXPERT_OBSERVATIONS

GRAPH = AnatomyGraph.default()
TINY = [
    "data.image_size=32",
    "data.sr_scale=1",
    "model.vit.patch_size=8",
    "model.vit.embed_dim=32",
    "model.vit.depth=2",
    "model.vit.num_heads=2",
    "model.vit.mlp_ratio=2.0",
    "model.text.hidden_size=32",
    "model.text.num_layers=1",
    "model.text.num_heads=2",
    "model.text.intermediate_size=64",
    "model.text.max_length=48",
    "model.mae.decoder_dim=32",
    "model.mae.decoder_depth=1",
    "model.mae.decoder_heads=2",
    "model.region.decoder_dim=32",
    "model.region.decoder_depth=1",
    "model.region.decoder_heads=2",
    "model.decoder.n_embd=32",
    "model.decoder.n_layer=1",
    "model.decoder.n_head=2",
    "model.decoder.n_positions=256",
    "model.decoder.max_report_tokens=40",
]
ALL = ("mae", "con", "region", "aca", "entity", "lm")


def make_batch(n=8, size=32, seed=0):
    studies = [render_study(i, size=size, seed=seed) for i in range(n)]
    img = torch.from_numpy(np.stack([s["image"] for s in studies])).float() / 255
    labels = np.nan_to_num(np.array([s["labels"] for s in studies], dtype=np.float64), nan=0.0) > 0
    return {"image": ((img - 0.4978) / 0.2449)[:, None].expand(-1, 3, -1, -1).contiguous(),
            "id": [f"s{i}" for i in range(n)], "report": [s["report"].lower() for s in studies],
            "labels": torch.from_numpy(labels).float(),
            "anatomies": torch.stack([GRAPH.leaf_mask(s["anatomies"]) for s in studies]),
            "index": torch.arange(n)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def tokenizers(batch):
    texts = [render_study(i, size=16, seed=1)["report"] for i in range(40)] + batch["report"]
    prompts = ["Findings: none.", "Findings: cardiomegaly, pleural effusion, edema."]
    return train_wordpiece(texts + list(GRAPH.leaf_names), 300), train_bpe(texts + prompts, 400)


def build(tokenizers, seed=0, overrides=(), **weights):
    cfg = load_config(
        overrides=TINY + list(overrides) + [f"loss.{k}.weight={v}" for k, v in weights.items()]
    )
    torch.manual_seed(seed)
    return SSACL.from_config(cfg, *tokenizers)


@pytest.mark.parametrize("form", ["official", "project"])
def test_all_losses_and_every_parameter_gets_a_gradient(tokenizers, batch, form):
    # the priors' and the per-leaf embedding's gradients included
    forms = [f"loss.{k}.form={form}" for k in ("con", "region", "aca")]
    model = build(tokenizers, overrides=["model.spatial_prior=true", "model.leaf_query_embed=true", *forms])
    out = model(batch)
    assert set(out) == {"loss", *ALL}
    cfg = load_config()
    total = sum(cfg.loss[k].weight * out[k] for k in ALL)
    torch.testing.assert_close(out["loss"], total)
    assert all(out[k].dim() == 0 and torch.isfinite(out[k]) for k in out)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert zero == []
    assert model.report_decoder.lm is not None and model.vit.num_patches == 16
    groups = param_groups(model, 0.05, model.lr_scales(0.25))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    scale = "tpar" if form == "official" else "contrastive.logit_scale"
    assert no_decay >= {"vit.cls_token", scale, "leaf_spatial_prior", "leaf_query_embed"}
    assert (model.tpar is not None) == (form == "official")
    lm = {names[id(p)] for g in groups if g["lr_scale"] == 0.25 for p in g["params"]}
    assert lm == {n for n in names.values() if n.startswith("report_decoder.lm.")}


def test_zero_weight_terms_are_neither_built_nor_computed(tokenizers, batch):
    model = build(tokenizers, lm=0, entity=0, region=0)
    assert model.report_decoder is None and model.entity_head is None and model.region is None
    built = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert not built & {"report_decoder", "entity_head", "region"}
    out = model(batch)
    assert set(out) == {"loss", "mae", "con", "aca"}
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # by design: with no MAE, entity head or LM nothing reads the CLS token; it still sits in the
    # autograd graph (a zero gradient, so DDP sees no unused parameter)
    ssl = build(tokenizers, lm=0, entity=0, mae=0)
    ssl(batch)["loss"].backward()
    trained = [(n, p) for n, p in ssl.named_parameters() if p.requires_grad]
    assert [n for n, p in trained if p.grad is None] == []
    assert [n for n, p in trained if p.grad.abs().sum() == 0] == ["vit.cls_token"]
    # the official region form decodes through the MAE decoder; its mask token is not trained
    assert ssl.mae_decoder is not None and not ssl.mae_decoder.mask_token.requires_grad
    with pytest.raises(ValueError, match="report decoder"):
        ssl.generate(batch)


def test_queries_and_passes(tokenizers, batch):
    model = build(tokenizers).eval()
    with torch.no_grad():
        leaf = model.leaf_queries()
        nodes = model.node_queries(leaf)
        assert leaf.shape == (25, 32) and nodes.shape == (32, 32)
        torch.testing.assert_close(nodes, GRAPH.restore(leaf))
        # leaf outputs of the 32-query pass are those of a 25-query pass (queries never see each
        # other)
        a = model.vit(batch["image"], leaf)["queries"]
        b = model.vit(batch["image"], nodes)["queries"][:, model.leaf_node_index]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_teacher_forcing_prompt_and_visual_mask(tokenizers, batch, monkeypatch):
    model = build(tokenizers, mae=0, con=0, region=0, aca=0, entity=0)
    seen = {}

    def spy(visual, visual_mask, prompts, reports, draws=None):
        seen.update(visual=visual, mask=visual_mask, prompts=prompts, reports=reports)
        return visual.float().pow(2).mean()
    monkeypatch.setattr(model.report_decoder, "forward", spy)
    model(batch)
    B = len(batch["id"])
    assert seen["visual"].shape == (B, 25 + 1 + 16, 32)
    # a normal study: every leaf
    shown = batch["anatomies"] | ~batch["anatomies"].any(-1, keepdim=True)
    assert torch.equal(seen["mask"][:, :25], shown) and seen["mask"][:, 26:].all()
    assert not seen["mask"][:, 25].any()  # CLS: masked in the official form
    visible = build(tokenizers, overrides=["model.decoder.cls_visible=true"], mae=0, con=0,
                    region=0, aca=0, entity=0)
    monkeypatch.setattr(visible.report_decoder, "forward", spy)
    visible(batch)
    assert seen["mask"][:, 25:].all()
    assert seen["reports"] == batch["report"]
    lab = batch["labels"]
    assert lab[:, CHEXPERT_OBSERVATIONS.index("Cardiomegaly")].any()
    for b in range(B):
        p = seen["prompts"][b]
        assert p.startswith("Findings:")
        for name in ("Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax"):
            assert (name.lower() in p) == bool(lab[b, CHEXPERT_OBSERVATIONS.index(name)]), (p, name)


def test_bf16_autocast(tokenizers, batch):
    model = build(tokenizers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_generate_and_heatmaps_from_the_image_only(tokenizers, batch):
    model = build(tokenizers).eval()
    # no report, labels or anatomies
    images_only = {"image": batch["image"][:3], "id": batch["id"][:3]}
    rows = model.generate(images_only, beam_size=2, max_new_tokens=6)
    assert [r["id"] for r in rows] == batch["id"][:3]
    for r in rows:
        assert isinstance(r["report"], str) and isinstance(r["entities"], list)
        assert r["anatomies"] and set(r["anatomies"]) <= set(GRAPH.leaf_names)
    greedy = model.generate(images_only, beam_size=1, max_new_tokens=4)
    assert len(greedy) == 3
    maps = model.heatmaps(batch["image"][:2])
    assert maps.shape == (2, 25, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(2).max(-1).values == 1).all()


def test_vit_init_from_mae_checkpoint(tokenizers, tmp_path):
    src = build(tokenizers, seed=5).vit
    torch.save({"model": src.state_dict()}, tmp_path / "mae.pth")
    cfg = load_config(overrides=TINY + [f"model.vit.init={tmp_path / 'mae.pth'}", "loss.lm.weight=0"])
    model = SSACL.from_config(cfg, *tokenizers)
    for k, v in src.state_dict().items():
        assert torch.equal(model.vit.state_dict()[k], v)


def test_fifty_steps_on_a_fixed_batch_drive_every_loss_down(tokenizers, batch):
    model = build(tokenizers, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    hist = {k: [] for k in ALL}
    torch.manual_seed(0)
    for _ in range(50):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        for k in ALL:
            hist[k].append(out[k].item())
    first = {k: np.mean(v[:5]) for k, v in hist.items()}
    last = {k: np.mean(v[-5:]) for k, v in hist.items()}
    # seen: mae 1.16 -> 0.60, con 2.67 -> 0.49, region 0.16 -> 0.08, aca 1.55 -> 0.09,
    for k in ALL:
        # entity 1.34 -> 0.53, lm 5.79 -> 3.12
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])


def test_batch_of_one(tokenizers, batch):
    model = build(tokenizers)
    one = {k: v[:1] for k, v in batch.items()}
    out = model(one)
    # one candidate
    assert torch.isfinite(out["loss"]) and out["con"].item() == pytest.approx(0.0, abs=1e-6)
    out["loss"].backward()
    model.eval()
    assert len(model.generate(one, beam_size=2, max_new_tokens=3)) == 1
    assert model.heatmaps(one["image"]).shape == (1, 25, 32, 32)


def test_location_prior_steers_each_leaf_to_its_patch_and_travels_in_the_state_dict(
    tokenizers, batch
):
    model = build(
        tokenizers,
        overrides=["model.location_prior.enabled=true", "model.location_prior.gain=10.0"],
    )
    assert model.needs_location_prior
    K, L = GRAPH.num_leaves, model.vit.num_patches
    target = torch.arange(K) % L
    prior = torch.full((K, L), 1e-4)
    prior[torch.arange(K), target] = 1.0
    model.location_prior.copy_(prior / prior.sum(1, keepdim=True))
    assert not model.needs_location_prior

    def peaks(m):
        attn = m.vit(batch["image"], m.leaf_queries(), return_attn=True, query_bias=m.query_bias())[
            "attn"
        ]
        return attn.argmax(-1)

    with torch.no_grad():
        assert (peaks(model) == target).all()
        maps = model.heatmaps(batch["image"])                                   # [B, K, 32, 32]
        g, p = model.vit.grid[1], model.vit.patch_size
        peak = maps.flatten(-2).argmax(-1)
        assert ((peak // 32 // p) * g + (peak % 32) // p == target).all()
        plain = build(tokenizers)
        # not so without the prior
        assert (peaks(plain) == target).float().mean() < 0.5
    rest = build(tokenizers, overrides=["model.location_prior.enabled=true", "loss.rest.weight=1.0"])
    rest.location_prior.copy_(model.location_prior)
    # every loss, all graph nodes
    out = rest(batch)
    assert torch.isfinite(out["loss"]) and out["rest"] > 0
    # the leaf attention learns from it
    out["rest"].backward()
    assert (
        rest.query_proj.weight.grad.abs().sum() > 0
        and rest.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    )
    with pytest.raises(ValueError, match="'rest'"):
        # needs the location prior
        build(tokenizers, overrides=["loss.rest.weight=1.0"])
    fresh = build(tokenizers, seed=1, overrides=["model.location_prior.enabled=true"])
    fresh.load_state_dict(model.state_dict())
    assert not fresh.needs_location_prior and torch.equal(
        fresh.location_prior, model.location_prior
    )


def test_from_checkpoint_takes_the_stored_tokenizers_and_names_a_bad_file(tokenizers, tmp_path):
    model = build(tokenizers)
    for name, tok in zip(("text_tokenizer", "decoder_tokenizer"), tokenizers):
        tok.save_pretrained(str(tmp_path / "run" / "tokenizers" / name))
    cfg = load_config(overrides=TINY)
    save_checkpoint(tmp_path / "elsewhere" / "c.pth", model=model, epoch=1, step=5, cfg=cfg,
                    extra={"tokenizer_files": tokenizer_files(tmp_path / "run")})
    loaded = SSACL.from_checkpoint(tmp_path / "elsewhere" / "c.pth", load_config(), "cpu")
    assert loaded.text_encoder.tokenizer.get_vocab() == tokenizers[0].get_vocab()
    assert loaded.report_decoder.tokenizer.get_vocab() == tokenizers[1].get_vocab()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=f"--checkpoint: {tmp_path / 'notes.pth'} is not a "
                                              "readable PyTorch checkpoint"):
        SSACL.from_checkpoint(tmp_path / "notes.pth", load_config(), "cpu")


@pytest.mark.parametrize("size", [224, 384, 512])
def test_any_resolution_trains_and_generates_with_a_bounded_prefix(tokenizers, size):
    """224, 384 and 512 px: a training step and generation, the LM reading the patches pooled to
    4 x 4 (model.decoder.prefix_grid) whatever the grid."""
    sets = [f"data.image_size={size}", "model.vit.patch_size=16", "model.decoder.prefix_grid=4",
            "model.decoder.n_positions=128"]
    model = build(tokenizers, overrides=sets)
    b = make_batch(n=2, size=size)
    out = model(b)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.vit.num_patches == (size // 16) ** 2
    seen = {}
    generate = model.report_decoder.generate

    def spy(visual, visual_mask, prompts, **kw):
        seen["visual"] = visual
        return generate(visual, visual_mask, prompts, **kw)

    model.report_decoder.generate = spy
    rows = model.eval().generate({"image": b["image"], "id": ["a", "b"]}, beam_size=1, max_new_tokens=3,
                                 min_new_tokens=0)
    assert len(rows) == 2 and seen["visual"].shape[1] == 25 + 1 + 16  # leaves, CLS, 4 x 4 pooled patches


def test_a_checkpoint_of_another_resolution_loads_with_its_grid_weights_resized(tokenizers, tmp_path):
    small = build(tokenizers, overrides=["data.image_size=32", "model.location_prior.enabled=true",
                                         "model.spatial_prior=true"])
    with torch.no_grad():
        small.contrastive.pos_weight.weight.copy_(torch.arange(16.0)[None])
        small.location_prior.copy_(torch.softmax(torch.randn(25, 16), -1))
    large = build(tokenizers, overrides=["data.image_size=64", "model.location_prior.enabled=true",
                                         "model.spatial_prior=true"])
    state = large.adapt_state_dict(small.state_dict())
    assert state["contrastive.pos_weight.weight"].shape == (1, 64)
    torch.testing.assert_close(state["location_prior"].sum(-1), torch.ones(25))
    large.load_state_dict(state)  # strictly: every grid-shaped entry now fits
    # the resized position weight keeps the layout: the corner patches keep the extreme values
    w = state["contrastive.pos_weight.weight"].view(8, 8)
    assert w[0, 0] < w[0, -1] < w[-1, 0] < w[-1, -1]


def test_evidence_inputs_read_the_attention_readout_not_the_query_tokens(tokenizers, batch, monkeypatch):
    """loss.<aca|region>.input=evidence: those losses see what each query takes from the image (its
    last-layer attention over the patch tokens), so their gradient reaches the attention logits."""
    model = build(tokenizers, overrides=["loss.aca.input=evidence", "loss.region.input=evidence"],
                  mae=0, con=0, lm=0, entity=0).eval()  # no dropout: the readout is recomputed below
    seen = {}
    aca_forward = model.aca.forward

    def spy(leaf_outputs, text, tpar):
        seen["aca"] = leaf_outputs
        return aca_forward(leaf_outputs, text, tpar)

    monkeypatch.setattr(model.aca, "forward", spy)
    out = model(batch)
    model.zero_grad()
    out["aca"].backward()
    with torch.no_grad():
        enc = model.vit(batch["image"], model.node_queries(model.leaf_queries()), return_attn=True)
        patches = enc["patches"] - enc["patches"].mean(1, keepdim=True)  # centred on the mean patch
        evidence = enc["attn"][:, model.leaf_node_index] @ patches
    torch.testing.assert_close(seen["aca"], evidence, atol=1e-5, rtol=1e-4)
    assert model.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.evidence_inputs == {"aca", "region"} and torch.isfinite(out["region"])
