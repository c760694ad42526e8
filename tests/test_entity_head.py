import pytest
import torch
import torch.nn.functional as F

from datasets.tokenizer import train_bpe, train_wordpiece
from models.entity_head import EntityHead, best_f1_thresholds, format_prompt, observation_names
from models.ssacl import SSACL
from utils.config import load_config
from vocab.anatomy_graph import AnatomyGraph
from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX

GRAPH = AnatomyGraph.default()

D = 16


def onehot(*names):
    v = torch.zeros(1, 14)
    for n in names:
        v[0, OBSERVATION_INDEX[n]] = 1.0
    return v


def rand_inputs(B, L=7, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(B, 25, L, generator=g).softmax(-1)
    local = torch.randn(B, L, D, generator=g, requires_grad=grad)
    return torch.randn(B, D, generator=g), torch.randn(B, L, D, generator=g), local, attn


def test_linear_logits_hand_computed():
    torch.manual_seed(0)
    head = EntityHead(D)
    with torch.no_grad():
        head.anat_bias.copy_(torch.randn(25))
    cls, patches, local, attn = rand_inputs(2)
    obs, anat = head(cls, patches, local, attn)
    evidence = F.layer_norm(attn @ local, (D,), head.norm.weight, head.norm.bias, head.norm.eps)
    pooled = torch.cat([cls, patches.mean(1), evidence.amax(1)], -1)
    assert torch.allclose(obs, pooled @ head.obs_head.weight.T + head.obs_head.bias, atol=1e-5)
    w, b = head.anat_head.weight[0], head.anat_head.bias[0]
    assert torch.allclose(anat, evidence @ w + b + head.anat_bias, atol=1e-5)


@pytest.mark.parametrize("hidden", [0, 8])
def test_each_leaf_logit_reads_only_the_patches_its_attention_selects(hidden):
    torch.manual_seed(0)
    head = EntityHead(D, hidden_dim=hidden)
    cls, patches, local, _ = rand_inputs(1, L=9, grad=True)
    attn = torch.zeros(1, 25, 9)
    attn[0, :, 0] = 1.0
    attn[0, 3] = 0.0
    attn[0, 3, [4, 5]] = 0.5            # leaf 3 looks at patches 4 and 5 only
    _, anat = head(cls, patches, local, attn)
    anat[0, 3].backward()
    grad_norm = local.grad[0].norm(dim=-1)
    assert grad_norm[4] > 0 and grad_norm[5] > 0
    assert grad_norm[[0, 1, 2, 3, 6, 7, 8]].abs().max() == 0


def test_loss_is_bce_and_training_fits_targets():
    torch.manual_seed(0)
    head = EntityHead(D, hidden_dim=16, loss="bce")
    B = 32
    cls, patches, local, attn = rand_inputs(B)
    labels = (cls[:, :14] > 0).float()               # learnable from CLS
    evidence = attn @ local
    # learnable from each leaf's own evidence
    anatomies = evidence[..., 0] > evidence[..., 0].median()
    obs, anat = head(cls, patches, local, attn)
    expected = (F.binary_cross_entropy_with_logits(obs, labels)
                + F.binary_cross_entropy_with_logits(anat, anatomies.float()))
    assert torch.allclose(head.loss(obs, anat, labels, anatomies), expected)
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    first = None
    for _ in range(150):
        loss = head.loss(*head(cls, patches, local, attn), labels, anatomies)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    _, anat = head(cls, patches, local, attn)
    assert ((anat > 0) == anatomies).float().mean() > 0.95


def test_anatomy_loss_teaches_attention_to_point_at_the_region():
    """Multiple-instance learning: 4 leaves, each owning 2 of 8 positions; a finding (a patch whose
    local feature has a marker) in a leaf's positions makes that leaf positive. Free attention
    logits per leaf, trained only by the anatomy loss through the shared scorer, must end up peaking
    on the leaf's own positions: the mechanism behind the grounding heatmaps."""
    torch.manual_seed(0)
    L, K, B = 8, 4, 64
    head = EntityHead(D, num_observations=1, num_leaves=K)
    owner = torch.arange(L) // 2                              # position -> leaf
    logits = torch.zeros(K, L, requires_grad=True)            # each leaf's attention over positions
    opt = torch.optim.Adam([logits, *head.parameters()], lr=5e-2)
    for _ in range(300):
        local = torch.randn(B, L, D) * 0.1
        where = torch.randint(0, L, (B,))
        has = torch.rand(B) < 0.7
        local[torch.arange(B)[has], where[has], 0] += 3.0     # the finding's marker
        target = torch.zeros(B, K, dtype=torch.bool)
        target[torch.arange(B)[has], owner[where[has]]] = True
        attn = logits.softmax(-1).expand(B, K, L)
        _, anat = head(torch.zeros(B, D), local, local, attn)
        loss = F.binary_cross_entropy_with_logits(anat, target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = logits.argmax(-1)
    assert torch.equal(owner[peak], torch.arange(K)), peak
    assert (logits.softmax(-1) * (owner[None] == torch.arange(K)[:, None])).sum(-1).min() > 0.6


def test_leaves_shown_falls_back_to_every_leaf_for_a_normal_study():
    anat = torch.tensor([[True, False, False], [False, False, False]])
    assert EntityHead.leaves_shown(anat).tolist() == [[True, False, False], [True, True, True]]


def test_prompt_strings():
    assert format_prompt([]) == "Findings: none."
    assert format_prompt(["No Finding"]) == "Findings: none."
    assert (
        format_prompt(["Cardiomegaly", "Pleural Effusion"])
        == "Findings: cardiomegaly, pleural effusion."
    )
    probs = torch.cat([onehot("Pleural Effusion", "Cardiomegaly") * 0.9, onehot("No Finding") * 0.7,
                       torch.full((1, 14), 0.4)])
    assert EntityHead.prompt(probs, 0.5) == [
        "Findings: cardiomegaly, pleural effusion.",
        "Findings: none.",
        "Findings: none.",
    ]
    assert EntityHead.prompt(probs, 0.3)[2] == "Findings: " + ", ".join(
        n.lower() for n in CHEXPERT_OBSERVATIONS if n != "No Finding") + "."


def test_no_finding_dropped_next_to_a_pathology_kept_with_devices():
    rows = torch.cat(
        [
            onehot("No Finding", "Edema"),
            onehot("No Finding", "Support Devices"),
            onehot("No Finding"),
        ]
    )
    assert observation_names(rows) == [["Edema"], ["Support Devices", "No Finding"], ["No Finding"]]


def test_predict_thresholds_and_all_leaves_fallback():
    obs = torch.full((2, 14), -5.0)
    obs[0, OBSERVATION_INDEX["Atelectasis"]] = 2.0
    anat = torch.full((2, 25), -3.0)
    anat[0, [1, 4]] = 1.0
    head = EntityHead(D, threshold=0.5)
    names, mask = head.predict(obs, anat)
    assert names == [["Atelectasis"], []]
    assert mask[0].nonzero().flatten().tolist() == [1, 4]
    assert mask[1].all()  # nothing predicted -> every leaf on (documented fallback)
    head.set_thresholds(torch.full((14,), 0.5), torch.full((25,), 0.8))  # 0.73 < 0.8: row 0 falls back
    assert head.predict(obs, anat)[1].all()
    # one threshold per class: atelectasis (p 0.88) off at 0.9, leaf 4 alone on at 0.7
    obs_t, anat_t = torch.full((14,), 0.5), torch.full((25,), 0.8)
    obs_t[OBSERVATION_INDEX["Atelectasis"]], anat_t[4] = 0.9, 0.7
    head.set_thresholds(obs_t, anat_t)
    names, mask = head.predict(obs, anat)
    assert names == [[], []] and mask[0].nonzero().flatten().tolist() == [4]


def test_positive_weights_from_prevalence_and_the_weighted_loss():
    labels = torch.zeros(10, 14)
    labels[:2, 0] = 1  # 2 positives of 10: weight 4; no positive: weight 1
    anatomies = torch.zeros(10, 25, dtype=torch.bool)
    anatomies[:5, 3] = True
    head = EntityHead(D, loss="weighted")
    head.set_prevalence(labels, anatomies, max_weight=20.0)
    assert head.obs_pos_weight[0] == 4.0 and head.obs_pos_weight[1] == 1.0 and head.anat_pos_weight[3] == 1.0
    obs, anat = torch.randn(10, 14), torch.randn(10, 25)
    expected = (F.binary_cross_entropy_with_logits(obs, labels, pos_weight=head.obs_pos_weight)
                + F.binary_cross_entropy_with_logits(anat, anatomies.float(), pos_weight=head.anat_pos_weight))
    torch.testing.assert_close(head.loss(obs, anat, labels, anatomies), expected)
    focal = EntityHead(D, loss="focal")
    p = obs.sigmoid()
    p_t = torch.where(labels.bool(), p, 1 - p)
    by_hand = -((1 - p_t) ** 2 * p_t.log()).mean()
    torch.testing.assert_close(focal._bce(obs, labels, None), by_hand)
    with pytest.raises(ValueError, match="model.entity.loss"):
        EntityHead(D, loss="hinge")


def test_best_f1_thresholds():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.3], [0.4, 0.1], [0.1, 0.05]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]])
    t = best_f1_thresholds(probs, targets, grid=torch.tensor([0.3, 0.5, 0.7]), default=0.42)
    # class 0: 0.5 keeps both positives and drops the 0.4 negative (F1 1); class 1 has no positive
    torch.testing.assert_close(t, torch.tensor([0.5, 0.42]))


class _Recorder:
    """Stand-in decoder that records what generation is given."""

    def generate(self, visual, visual_mask, prompts, **kw):
        self.visual, self.mask, self.prompts, self.kw = visual, visual_mask, prompts, kw
        return [f"report {i}" for i in range(len(prompts))]


# --------------------------------------------------------------------------- through SSACL.generate

def tiny_ssacl():
    texts = ["the heart is normal in size . no pleural effusion .", "small left pleural effusion .",
             "Findings: cardiomegaly, pleural effusion, atelectasis, edema, none."]
    cfg = load_config(None)
    cfg.data.image_size = 32
    cfg.model.vit.update(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    cfg.model.text.update(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=200
    )
    for k in ("mae", "region"):
        cfg.model[k].update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg.model.decoder.update(n_embd=32, n_layer=2, n_head=2, n_positions=256)
    torch.manual_seed(0)
    return SSACL.from_config(cfg, train_wordpiece(texts, 200), train_bpe(texts, 300)).eval()


def test_generate_uses_the_head_predictions():
    model = tiny_ssacl()
    head = model.entity_head
    with torch.no_grad():  # a head that predicts cardiomegaly and two leaves, whatever the image
        head.obs_head.weight.zero_()
        head.obs_head.bias.fill_(-5.0)
        head.obs_head.bias[OBSERVATION_INDEX["Cardiomegaly"]] = 5.0
        head.anat_head.weight.zero_()
        head.anat_bias.fill_(-5.0)
        head.anat_bias[[0, 7]] = 5.0
    rec = _Recorder()
    model.report_decoder.generate = rec.generate
    images = torch.randn(2, 3, 32, 32)
    rows = model.generate({"image": images, "id": ["a", "b"]}, beam_size=3)
    assert rec.prompts == ["Findings: cardiomegaly."] * 2 and rec.kw == {"beam_size": 3}
    u = model.vit(images, model.leaf_queries(), return_attn=True)
    assert torch.allclose(rec.visual, torch.cat([u["queries"], u["cls"][:, None], u["patches"]], 1))
    expected_mask = torch.zeros(2, 25 + 1 + 16, dtype=torch.bool)
    expected_mask[:, [0, 7]] = True
    expected_mask[:, 26:] = True  # the patches; CLS is masked (model.decoder.cls_visible: false)
    assert torch.equal(rec.mask, expected_mask)
    assert rows[1] == {"id": "b", "report": "report 1", "entities": ["Cardiomegaly"],
                       "anatomies": [GRAPH.leaf_names[0], GRAPH.leaf_names[7]]}


def test_ssacl_generate_ignores_reference_report_labels_and_anatomies():
    model = tiny_ssacl()
    B = 3
    torch.manual_seed(1)
    images = torch.randn(B, 3, 32, 32)
    batch = {
        "image": images,
        "id": ["a", "b", "c"],
        "report": ["the heart is normal ."] * B,
        "labels": torch.zeros(B, 14),
        "anatomies": torch.ones(B, 25, dtype=torch.bool),
        "index": torch.arange(B),
    }
    corrupt = {
        **batch,
        "report": ["small left pleural effusion ."] * B,
        "labels": torch.ones(B, 14),
        "anatomies": torch.rand(B, 25) > 0.5,
    }
    kw = dict(beam_size=2, max_new_tokens=6)
    out = model.generate(batch, **kw)
    assert model.generate(corrupt, **kw) == out
    assert [o["id"] for o in out] == ["a", "b", "c"]
    # the predicted anatomy set is what the decoder sees: another set gives another report, so the
    # equality above would break if generate read the batch's anatomies
    u = model.vit(images, model.leaf_queries(), return_attn=True)
    visual = torch.cat([u["queries"], u["cls"][:, None], u["patches"]], 1)
    rest = torch.ones(B, visual.shape[1] - 25, dtype=torch.bool)
    rest[:, 0] = model.report_decoder.cls_visible  # CLS
    prompts = [format_prompt(o["entities"]) for o in out]
    pred_mask = torch.stack([GRAPH.leaf_mask(o["anatomies"]) for o in out])
    same = model.report_decoder.generate(visual, torch.cat([pred_mask, rest], 1), prompts, **kw)
    assert same == [o["report"] for o in out]
    other = model.report_decoder.generate(
        visual, torch.cat([~pred_mask | (torch.arange(25) < 2), rest], 1), prompts, **kw
    )
    assert other != same
