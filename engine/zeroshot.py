"""Zero-shot evaluation (main_zeroshot.py): classification from text prompts, image-text retrieval,
phrase grounding, on the datasets.downstream data sets (cfg.zeroshot).

Every loop shards a split over the ranks (in order, the sampler pads the last shard); each rank
embeds its images / texts or scores its grounding items, the rows are gathered with their dataset
index and de-duplicated (utils.dist.gather_unique), and rank 0 computes the figures, which every rank
then returns. The model: an SS-ACL checkpoint (pretraining or report fine-tuning; architecture,
tokenizers and weights from it), or random init (the baseline; the checkpoint's architecture and
tokenizers when one is named, else cfg.model with the configured or trained tokenizers).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from datasets.annotation import DataError
from datasets.cxr import build_dataset
from datasets.downstream import Indexed, build_downstream, collate_downstream
from datasets.loaders import eval_loader, subset_loader, to_device
from datasets.tokenizer import build_tokenizers, checkpoint_tokenizers
from engine.optim import autocast, resolve_amp
from metrics.classification import choose_thresholds
from metrics.retrieval import retrieval_metrics
from metrics.zeroshot import classification_metrics, official_grounding, prompt_scores, summarize
from models.embeddings import (
    PHRASE_METHODS,
    cls_attention_maps,
    encode_images,
    has_location_prior,
    image_embeddings,
    logit_scale,
    phrase_maps,
    prior_phrase_maps,
    require_contrastive,
    text_embeddings,
    to_image,
)
from models.lm_scoring import require_decoder, text_log_likelihoods, visual_inputs
from models.location_prior import estimate_location_prior
from models.ssacl import SSACL
from utils.checkpoint import read_checkpoint
from utils.config import with_defaults
from utils.dist import broadcast_object, gather_objects, gather_unique, is_main_process

MAPS = (*PHRASE_METHODS, "cls", "prior")
FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
# prompts in the wording of the training reports (datasets/synthetic_reports.py; MIMIC-CXR style);
# label names are matched lower-cased with "_" read as a space
BUILTIN_PROMPTS = {
    "atelectasis": (["there is atelectasis at the base", "basilar atelectasis"],
                    ["the lungs are clear", "the lungs are well expanded and clear"]),
    "cardiomegaly": (["there is cardiomegaly", "the heart is enlarged", "moderate cardiomegaly"],
                     ["the heart size is normal", "normal heart size"]),
    "consolidation": (["there is consolidation in the lung", "focal consolidation"],
                      ["there is no focal consolidation", "no focal consolidation"]),
    "edema": (["there is mild pulmonary edema", "mild perihilar pulmonary edema"],
              ["the lungs are clear", "the lungs are well expanded and clear"]),
    "pleural effusion": (["there is a pleural effusion", "small pleural effusion"],
                         ["there is no pleural effusion", "no pleural effusion"]),
    "effusion": (["there is a pleural effusion", "small pleural effusion"],
                 ["there is no pleural effusion", "no pleural effusion"]),
    "pneumothorax": (["there is a small apical pneumothorax", "apical pneumothorax"],
                     ["there is no pneumothorax", "no pneumothorax"]),
    "pneumonia": (["there is consolidation in the lung", "there is an opacity in the lung"],
                  ["the lungs are clear", "there is no focal consolidation"]),
    "lung opacity": (["there is an opacity in the lung", "patchy opacity"],
                     ["the lungs are clear", "the lungs are well expanded and clear"]),
    "infiltration": (["there is an opacity in the lung", "patchy opacity"],
                     ["the lungs are clear", "the lungs are well expanded and clear"]),
    "nodule": (["there is a nodule in the lung", "a nodule is seen"],
               ["the lungs are clear", "the lungs are well expanded and clear"]),
    "mass": (["there is a hilar mass", "a mass is seen at the hilum"],
             ["the lungs are clear", "the mediastinal contours are normal"]),
    "lung lesion": (["there is a nodule in the lung", "there is a hilar mass"],
                    ["the lungs are clear", "the lungs are well expanded and clear"]),
    "fracture": (["there is a fracture of the clavicle", "acute fracture"],
                 ["no acute osseous abnormality", "the osseous structures are intact"]),
    "enlarged cardiomediastinum": (["the mediastinum is widened", "widened mediastinum"],
                                   ["the mediastinal contours are normal", "normal mediastinal contours"]),
}


# ---------------------------------------------------------------------------------------- model
def build_model(cfg, checkpoint: str | None, random_init: bool, device) -> tuple[SSACL, str]:
    """(model in eval mode, a name for it). A checkpoint without the SS-ACL config or text encoder
    (an MAE ViT) is an error naming it."""
    if checkpoint and not random_init:
        ckpt = read_checkpoint(checkpoint, "--checkpoint", ("model",))
        if "config" not in ckpt or not any(k.startswith("text_encoder.") for k in ckpt["model"]):
            raise ValueError(
                f"{checkpoint}: not an SS-ACL checkpoint (no stored config or text encoder; an MAE ViT "
                "checkpoint is image-only): zero-shot classification, retrieval and text-prompted "
                "grounding need the text encoder an SS-ACL pretraining run trains (main_pretrain.py); "
                "--random-init gives the untrained baseline")
        del ckpt
        return SSACL.from_checkpoint(checkpoint, cfg, device).eval(), str(checkpoint)
    torch.manual_seed(cfg.seed)
    if checkpoint:  # the checkpoint's architecture and tokenizers, fresh weights
        ckpt = read_checkpoint(checkpoint, "--checkpoint", ("model", "config"))
        source = f"{checkpoint} (its stored config)"
        cfg.model = with_defaults("model", ckpt["config"]["model"], source)
        cfg.loss = with_defaults("loss", ckpt["config"]["loss"], source)
        cfg.data.image_size = ckpt["config"]["data"]["image_size"]
        toks = checkpoint_tokenizers(checkpoint, ckpt)
        name = f"random init ({checkpoint}'s architecture)"
    else:
        if cfg.model.vit.init and needs_text(cfg.zeroshot):
            raise ValueError(
                f"model.vit.init={cfg.model.vit.init}: an MAE ViT checkpoint has no text encoder, so "
                "zero-shot classification, retrieval and text-prompted maps are undefined for it; "
                "only grounding with zeroshot.maps=[cls, prior] reads the image encoder alone")
        reports = [] if cfg.model.text.tokenizer and cfg.model.decoder.tokenizer else \
            [s.report for s in build_dataset(cfg, "train", train=False).samples]
        toks, name = build_tokenizers(cfg, reports), "random init (cfg.model)"
        if cfg.model.vit.init:
            name = f"MAE ViT {cfg.model.vit.init} (image encoder only; the rest random)"
    if checkpoint:
        cfg.model.vit.init = None
    cfg.data.sr_scale = 1
    model = SSACL.from_config(cfg, *toks)
    print(f"zero-shot model: {name}")
    return model.to(device).eval(), name


# ---------------------------------------------------------------------------------------- data
def task_root(zs, task: str) -> str:
    return str(zs.roots.get(task) or f"{zs.data_root.rstrip('/')}/{task}")


def downstream_loader(task: str, split: str, cfg, info) -> DataLoader:
    """One split in order, sharded over the ranks; its items carry their "index"."""
    zs = cfg.zeroshot
    dataset = build_downstream(task, task_root(zs, task), split, cfg.data.image_size, train=False,
                               seed=cfg.seed)
    if zs.max_samples > 0:
        dataset = Subset(dataset, range(min(zs.max_samples, len(dataset))))
    print(f"zero-shot {task} {split}: {len(dataset)} items ({task_root(zs, task)})")
    return eval_loader(Indexed(dataset), cfg, info, collate_downstream)


def _batches(loader, device):
    """(batch on device with 3-channel images, its dataset indices); unreadable items are left out
    by the collate."""
    for batch in loader:
        if batch is None:
            continue
        batch = to_device(batch, device)
        batch["image"] = batch["image"].expand(-1, 3, -1, -1)  # one channel -> the ViT's three
        yield batch, batch["index"].tolist()


def _label_names(dataset, task: str) -> list[str]:
    names = getattr(dataset, "label_names", None)
    return list(names) if names else (FIVE if task == "chexpert5x200" else [])


# ---------------------------------------------------------------------------------------- prompts
def label_prompts(label_names: list[str], zs) -> dict[str, tuple[list[str], list[str]]]:
    """label -> (positive prompts, negative prompts): zeroshot.prompts, else BUILTIN_PROMPTS, else
    the zeroshot.positive / negative templates."""
    out = {}
    for name in label_names:
        key = name.lower().replace("_", " ")
        given = zs.prompts.get(name) or zs.prompts.get(key)
        if given is not None:
            if not isinstance(given, dict) or not given.get("pos") or not given.get("neg"):
                raise ValueError(f"zeroshot.prompts.{name} must be {{pos: [...], neg: [...]}}, "
                                 f"got {given!r}")
            pos, neg = given["pos"], given["neg"]
            out[name] = ([pos] if isinstance(pos, str) else list(pos),
                         [neg] if isinstance(neg, str) else list(neg))
        elif key in BUILTIN_PROMPTS:
            out[name] = BUILTIN_PROMPTS[key]
        else:
            out[name] = ([zs.positive.format(label=key)], [zs.negative.format(label=key)])
    return out


def prompt_vectors(model, prompts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, Dt] positive and negative vectors: each label's prompts' mean, renormalised."""
    def mean(texts):
        return torch.nn.functional.normalize(text_embeddings(model, texts).mean(0), dim=-1)
    return (torch.stack([mean(p) for p, _ in prompts.values()]),
            torch.stack([mean(n) for _, n in prompts.values()]))


# ---------------------------------------------------------------------------------------- loops
@torch.no_grad()
def _image_rows(model, task, split, cfg, info, score=None, captions: bool = False) -> list | None:
    """Rank 0: [{"index", "labels", "image" [Dt] (embedding scorer) or "score" (``score(batch)``
    [b, C], lm scorer), and with ``captions`` "caption" [Dt] and "text"}] of a split, in order."""
    loader = downstream_loader(task, split, cfg, info)
    dtype, rows = resolve_amp(cfg.train.amp, info.device), []
    for batch, index in _batches(loader, info.device):
        with autocast(info.device, dtype):
            values = {"score": score(batch).float().cpu()} if score else \
                {"image": image_embeddings(model, batch["image"]).cpu()}
            if captions:
                values["caption"] = text_embeddings(model, batch["caption"]).cpu()
        for j, i in enumerate(index):
            row = {"index": i, "labels": batch["labels"][j].float().cpu(),
                   **{k: v[j] for k, v in values.items()}}
            if captions:
                row["text"] = batch["caption"][j]
            rows.append(row)
    return gather_unique(rows)


def _lm_scorer(model, texts: list[str], combine):
    """batch -> combine([b, T] log p(text | image) of ``texts``) (models/lm_scoring.py)."""
    def score(batch):
        visual, mask = visual_inputs(model, batch["image"])
        return combine(text_log_likelihoods(model, visual, mask, texts))
    return score


def classification(model, task: str, cfg, info) -> dict:
    """AUROC, accuracy / F1 at validation-chosen thresholds (zeroshot.threshold_split), top-1.
    Scores: softmax over (positive, negative) similarity (embedding), or sigmoid of the mean
    log-likelihood of the positive prompts minus that of the negative ones (lm)."""
    zs = cfg.zeroshot
    names = _label_names(build_downstream(task, task_root(zs, task), zs.split, cfg.data.image_size),
                         task)
    prompts = label_prompts(names, zs)
    if zs.scorer == "lm":
        texts = [t for pos, neg in prompts.values() for t in pos + neg]
        sign = torch.zeros(len(texts), len(names))  # [T, C]: +1/|pos| positive, -1/|neg| negative
        k = 0
        for c, (pos, neg) in enumerate(prompts.values()):
            sign[k:k + len(pos), c] = 1.0 / len(pos)
            sign[k + len(pos):k + len(pos) + len(neg), c] = -1.0 / len(neg)
            k += len(pos) + len(neg)
        score = _lm_scorer(model, texts, lambda ll: torch.sigmoid(ll @ sign.to(ll.device)))
    else:
        positive, negative = (v.cpu() for v in prompt_vectors(model, prompts))
        scale, score = logit_scale(model), None

    def scores(split):
        rows = _image_rows(model, task, split, cfg, info, score)
        if rows is None:
            return None, None
        labels = torch.stack([r["labels"] for r in rows])
        if score is not None:
            return torch.stack([r["score"] for r in rows]), labels
        z = torch.stack([r["image"] for r in rows])
        return prompt_scores(z, positive, negative, scale), labels

    val, note = (None, None), "0.5 (zeroshot.threshold_split is empty)"
    if zs.threshold_split:
        try:
            val, note = scores(zs.threshold_split), f"max F1 on {zs.threshold_split}"
        except DataError as e:  # e.g. CheXpert 5x200: a test file only
            note = f"0.5 (no {zs.threshold_split} split: {e})"
    test = scores(zs.split)
    out = None
    if is_main_process():
        thresholds = (choose_thresholds(val[0].numpy(), val[1].numpy()) if val[0] is not None
                      else [0.5] * len(names))
        out = {**classification_metrics(test[0].numpy(), test[1].numpy(), names, thresholds),
               "thresholds": note}
    return broadcast_object(out)


def retrieval(model, task: str, cfg, info) -> dict:
    """Image-to-text and text-to-image P@K (class-based) and R@K (own caption / image). Similarity:
    cosine (embedding), or log p(caption | image) minus its mean over the images (lm: the
    caption's own prior does not rank it)."""
    zs = cfg.zeroshot
    texts_only = (lambda b: b["image"].new_zeros(len(b["image"]), 0)) if zs.scorer == "lm" else None
    rows = _image_rows(model, task, zs.split, cfg, info, texts_only, captions=True)
    if zs.scorer == "lm":
        texts = broadcast_object([r["text"] for r in rows] if rows is not None else None)
        scored = _image_rows(model, task, zs.split, cfg, info, _lm_scorer(model, texts, lambda x: x))
    out = None
    if is_main_process():
        classes = torch.stack([r["labels"] for r in rows]).argmax(1).numpy()
        if zs.scorer == "lm":
            ll = torch.stack([r["score"] for r in scored])
            sim = (ll - ll.mean(0, keepdim=True)).numpy()
        else:
            z, t = torch.stack([r["image"] for r in rows]), torch.stack([r["caption"] for r in rows])
            sim = (z @ t.T).numpy()
        i2t = retrieval_metrics(sim, classes, classes, ks=zs.retrieval_k)
        t2i = retrieval_metrics(sim.T, classes, classes, ks=zs.retrieval_k)
        out = {**{f"i2t/{k}": v for k, v in i2t.items()}, **{f"t2i/{k}": v for k, v in t2i.items()},
               "num_pairs": len(rows)}
    return broadcast_object(out)


@torch.no_grad()
def report_prior(model, cfg, info) -> tuple[torch.Tensor | None, str]:
    """([K, L] report-derived location prior, '') estimated as models/location_prior.py does, from
    cfg.data.annotation's train split (images and report anatomies, no box), over
    model.location_prior.max_images of them; (None, reason) when that split cannot be read."""
    try:
        dataset = build_dataset(cfg, "train", train=False)
    except (DataError, OSError) as e:
        return None, f"cannot read the report-derived prior's training data: {e}"
    loader = subset_loader(dataset, cfg.model.location_prior.max_images, cfg, info)
    batches = ({**b, "image": model.encoder_images(b["image"])} for b in loader if b is not None)
    prior = estimate_location_prior(batches, model.graph.num_leaves, model.vit.img_size,
                                    model.vit.patch_size, info.device)
    print(f"location prior: estimated from {len(dataset)} training studies of {cfg.data.annotation}")
    return prior.to(info.device), ""


@torch.no_grad()
def train_mask_prior(task: str, cfg, info) -> tuple[dict | None, str]:
    """({label: mean training box mask [S, S]}, '') from the task's train split; (None, reason)
    when that split cannot be read."""
    try:
        loader = downstream_loader(task, "train", cfg, info)
    except (DataError, OSError) as e:
        return None, f"no train split to estimate a box prior from: {e}"
    sums: dict = {}
    for batch, _ in _batches(loader, "cpu"):
        for label, mask in zip(batch["label"], batch["box_mask"].float()):
            total, n = sums.get(label, (0.0, 0))
            sums[label] = (total + mask, n + 1)
    gathered = gather_objects(sums)
    prior = None
    if gathered is not None:
        merged: dict = {}
        for part in gathered:
            for label, (total, n) in part.items():
                t0, n0 = merged.get(label, (0.0, 0))
                merged[label] = (t0 + total, n0 + n)
        prior = {k: t / n for k, (t, n) in merged.items()}
        prior[""] = sum(t for t, _ in merged.values()) / max(sum(n for _, n in merged.values()), 1)
    return broadcast_object(prior), ""


@torch.no_grad()
def grounding(model, task: str, cfg, info) -> dict:
    """Official-protocol figures (metrics/zeroshot.py) of every map in zeroshot.maps; "text" is
    zeroshot.phrase_method's. The prior: the model's location prior, else training masks per label."""
    zs, dtype = cfg.zeroshot, resolve_amp(cfg.train.amp, info.device)
    unknown = [m for m in zs.maps if m not in MAPS]
    if unknown:
        raise ValueError(f"zeroshot.maps: unknown {unknown} (known: {', '.join(MAPS)})")
    maps, notes = list(zs.maps), {}
    leaf_prior = mask_prior = None  # the model's own location prior when it has one
    if "prior" in maps and not has_location_prior(model):
        leaf_prior, why = report_prior(model, cfg, info)
        notes["prior/source"] = "report-derived, estimated from cfg.data.annotation"
        if leaf_prior is None:
            mask_prior, why2 = train_mask_prior(task, cfg, info)
            notes["prior/source"] = f"mean training box per label ({why})"
            if mask_prior is None:
                maps.remove("prior")
                notes["prior/skipped"] = f"{why}; {why2}"
    elif "prior" in maps:
        notes["prior/source"] = "the model's location prior"
    loader = downstream_loader(task, zs.split, cfg, info)
    rows = []
    for batch, index in _batches(loader, info.device):
        images, phrases, S = batch["image"], list(batch["phrase"]), batch["image"].shape[-1]
        with autocast(info.device, dtype):
            encoded = encode_images(model, images)
            grids = {m: phrase_maps(model, images, phrases, m, encoded) for m in maps
                     if m in PHRASE_METHODS}
            if "cls" in maps:
                grids["cls"] = cls_attention_maps(model, encoded=encoded)
        drawn = {m: to_image(g, S, zs.sigma, zs.upsample) for m, g in grids.items()}
        if "prior" in maps:
            if mask_prior is None:
                grid = prior_phrase_maps(model, phrases, leaf_prior)
                drawn["prior"] = to_image(grid, S, zs.sigma, zs.upsample)
            else:
                drawn["prior"] = [mask_prior.get(lb, mask_prior[""]).numpy() for lb in batch["label"]]
        masks = batch["box_mask"].cpu().numpy() > 0.5
        for j, i in enumerate(index):
            rows.append({"index": i, "label": batch["label"][j],
                         **{m: official_grounding(drawn[m][j], masks[j]) for m in drawn}})
    rows = gather_unique(rows)
    out = None
    if is_main_process():
        out = {"num_phrases": len(rows)}
        for m in maps:
            summary = summarize([{"label": r["label"], **r[m]} for r in rows])
            out.update({f"{m}/{k}": v for k, v in summary.items() if k != "n"})
            if m == zs.phrase_method:
                out.update({f"text/{k}": v for k, v in summary.items() if k != "n"})
        out.update(notes)
    return broadcast_object(out)


def needs_text(zs) -> bool:
    """True when cfg.zeroshot runs anything that reads the text encoder."""
    return bool(zs.classification or zs.retrieval
                or (zs.grounding and any(m in PHRASE_METHODS for m in zs.maps)))


def run_zeroshot(model, cfg, info, source: str) -> dict:
    """Every task of cfg.zeroshot: {"classification/<task>/...", "retrieval/<task>/...",
    "grounding/<task>/..."} (the same on every rank)."""
    zs, results = cfg.zeroshot, {}
    embedding = zs.scorer == "embedding" and (zs.classification or zs.retrieval)
    if embedding or (zs.grounding and {"leaves", "patches"} & set(zs.maps)):
        require_contrastive(model, source)
    if zs.scorer == "lm" and (zs.classification or zs.retrieval):
        require_decoder(model, source)
    for kind, fn in (("classification", classification), ("retrieval", retrieval),
                     ("grounding", grounding)):
        for task in zs[kind]:
            figures = fn(model, task, cfg, info)
            results.update({f"{kind}/{task}/{k}": v for k, v in figures.items()})
    return results
