"""Zero-shot read-outs of a trained SSACL (models/ssacl.py); nothing here is trained.

image vector  the contrastive head's: img_proj(mean of the unmasked pass's patch tokens), L2-normalised
              (training meant the visible half; the official zero-shot and retrieval code mean all)
text vector   the text encoder's pooled embedding (mean over the tokens), L2-normalised
scale         the logit scale the contrastive loss trained: Tpar (official form) or exp(tau) (project)
CLS map       the CLS token's last-layer attention over the patches, heads averaged (the official
              grounding protocol). Read by running a copy of the CLS token as one more query: queries
              and CLS follow the same rule (themselves and the patches, no position), so that query's
              attention is CLS's own, and the queries never change the patches.
Text-prompted maps of a phrase, [B, h, w] over the patch grid (``PHRASE_METHODS``):
  leaves      (the method's own) every anatomy leaf's evidence, its last-layer attention readout of the
              patch tokens (a weighted mean of patch tokens, what img_proj was trained on), is
              projected by the contrastive head to the text space and scored against the phrase vector;
              the leaves' attention maps are mixed with softmax(scale * cosine) over the leaves.
  leaf_names  the same mixture, the weights from the phrase against each leaf name's text vector (the
              names the leaf queries are made of): the image does not choose the leaf.
  named_leaves  the mean attention map of the leaves the phrase names (the anatomy parser of
              vocab/report_text.py, every leaf when it names none): the leaves the location prior
              baseline draws, seen through this image's attention.
  patches     cosine of img_proj(patch token) with the phrase vector, per patch (BioViL-style).
  query       the phrase's text vector through query_proj, run as an extra query (as a leaf name is):
              its last-layer attention. The ViT only ever saw the 25 leaf names there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vocab.report_text import sentence_anatomies

PHRASE_METHODS = ("leaves", "leaf_names", "named_leaves", "patches", "query")


def require_contrastive(model, source: str) -> None:
    """Zero-shot classification, retrieval and text-prompted maps need the image-text projection."""
    if model.contrastive is None:
        raise ValueError(
            f"{source}: the model was trained without the contrastive loss (loss.con.weight=0), so it "
            "has no image-text projection: zero-shot classification, retrieval and text-prompted "
            "grounding are undefined for it")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def logit_scale(model) -> float:
    """The contrastive loss's scale: Tpar (official), exp(tau) clamped (project), else 1."""
    if model.tpar is not None:
        return float(model.tpar.detach())
    c = model.contrastive
    if c is not None and hasattr(c, "logit_scale"):
        return float(c.logit_scale.detach().exp().clamp(max=c.max_logit_scale))
    return 1.0


@torch.no_grad()
def pooled_text(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """[N, Dt] the text encoder's pooled vectors (not normalised), fp32."""
    out = [model.text_encoder.encode_texts(list(texts[i:i + batch_size]), _device(model))[1].float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.text_encoder.hidden_size)


def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    """[N, Dt] L2-normalised text vectors."""
    return F.normalize(pooled_text(model, texts), dim=-1)


@torch.no_grad()
def encode_images(model, images: torch.Tensor) -> dict:
    """One unmasked pass with the leaf queries and a copy of CLS: patches [B, L, D], leaf_attn
    [B, K, L], cls_attn [B, L] (last layer, heads averaged)."""
    leaves = model.leaf_queries()
    cls = model.vit.cls_token[0].to(leaves.dtype)  # [1, D]
    bias = model.query_bias()
    if bias is not None:  # the CLS copy gets no spatial prior, as CLS itself
        bias = torch.cat([bias, bias.new_zeros(1, bias.shape[-1])])
    out = model.vit(model.encoder_images(images), torch.cat([leaves, cls]), return_attn=True,
                    query_bias=bias)
    attn = out["attn"].float()
    return {"patches": out["patches"], "leaf_attn": attn[:, :-1], "cls_attn": attn[:, -1]}


def image_embeddings(model, images: torch.Tensor | None = None, encoded: dict | None = None):
    """[B, Dt] L2-normalised image vectors (from ``images``, or an ``encode_images`` result)."""
    encoded = encoded or encode_images(model, images)
    return F.normalize(model.contrastive.image_vectors(encoded["patches"]).float(), dim=-1)


def _grid(model, maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(maps.shape[0], *model.vit.grid)


def cls_attention_maps(model, images: torch.Tensor | None = None, encoded: dict | None = None):
    """[B, h, w]: CLS's last-layer attention over the patches (the official protocol's map)."""
    encoded = encoded or encode_images(model, images)
    return _grid(model, encoded["cls_attn"])


def named_leaves(model, phrases: list[str]) -> torch.Tensor:
    """[P, K] uniform weights over the leaves each phrase names (all leaves when none)."""
    index = model.graph.leaf_index
    weights = torch.zeros(len(phrases), model.graph.num_leaves)
    for i, phrase in enumerate(phrases):
        leaves = [index[n] for _, names in sentence_anatomies(phrase, model.graph) for n in names]
        weights[i, leaves or slice(None)] = 1.0
    return weights / weights.sum(-1, keepdim=True)


def leaf_weights(model, encoded: dict, phrase_vectors: torch.Tensor, method: str) -> torch.Tensor:
    """[B, K] softmax weights of the leaves for each image's phrase (``leaves`` or ``leaf_names``)."""
    if method == "leaves":
        attn = encoded["leaf_attn"] / encoded["leaf_attn"].sum(-1, keepdim=True).clamp_min(1e-12)
        evidence = attn.to(encoded["patches"].dtype) @ encoded["patches"]  # [B, K, D]
        keys = F.normalize(model.contrastive.img_proj(evidence).float(), dim=-1)
        sims = torch.einsum("bkd,bd->bk", keys, phrase_vectors)
    else:
        names = text_embeddings(model, list(model.leaf_names))  # [K, Dt]
        sims = phrase_vectors @ names.T
    return (logit_scale(model) * sims).softmax(-1)


@torch.no_grad()
def phrase_maps(model, images: torch.Tensor, phrases: list[str], method: str = "leaves",
                encoded: dict | None = None) -> torch.Tensor:
    """[B, h, w] text-prompted maps (module docstring), one phrase per image."""
    if method not in PHRASE_METHODS:
        raise ValueError(f"phrase map method must be one of {', '.join(PHRASE_METHODS)}, got {method!r}")
    if len(phrases) != images.shape[0]:
        raise ValueError(f"{len(phrases)} phrases for {images.shape[0]} images")
    pooled = pooled_text(model, phrases)
    vectors = F.normalize(pooled, dim=-1)
    if method == "query":
        queries = model.query_proj(pooled.to(model.query_proj.weight.dtype))[:, None]  # [B, 1, D]
        attn = model.vit(model.encoder_images(images), queries, return_attn=True)["attn"]
        return _grid(model, attn[:, 0].float())
    encoded = encoded or encode_images(model, images)
    if method == "patches":
        keys = F.normalize(model.contrastive.img_proj(encoded["patches"]).float(), dim=-1)
        return _grid(model, torch.einsum("bld,bd->bl", keys, vectors))
    weights = (named_leaves(model, phrases).to(vectors.device) if method == "named_leaves"
               else leaf_weights(model, encoded, vectors, method))
    attn = encoded["leaf_attn"] / encoded["leaf_attn"].sum(-1, keepdim=True).clamp_min(1e-12)
    return _grid(model, torch.einsum("bk,bkl->bl", weights, attn))


def has_location_prior(model) -> bool:
    return model.location_prior is not None and not model.needs_location_prior


def prior_phrase_maps(model, phrases: list[str], prior: torch.Tensor | None = None) -> torch.Tensor:
    """[P, h, w]: a location prior alone (image-independent; ``prior`` [K, L], default the model's):
    the mean of the prior rows of the leaves each phrase names (vocab/report_text.py), of every leaf
    when it names none."""
    if prior is None and not has_location_prior(model):
        raise ValueError("the model has no estimated location prior: pass one")
    prior = (model.location_prior if prior is None else prior).float()
    return _grid(model, named_leaves(model, phrases).to(prior.device) @ prior)


def to_image(maps: torch.Tensor, size: int, sigma: float = 1.5, mode: str = "nearest") -> np.ndarray:
    """[B, h, w] patch-grid maps -> [B, size, size] float64, as the official grounding code draws
    them: a Gaussian blur of ``sigma`` patches on the grid (scipy, reflect), then upsampled
    (``mode``: nearest, the official, or bilinear)."""
    grid = maps.detach().float().cpu().numpy().astype(np.float64)
    if sigma > 0:
        grid = np.stack([gaussian_filter(m, sigma=(sigma, sigma)) for m in grid])
    up = torch.from_numpy(grid)[:, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(up, size=(size, size), mode=mode, **kwargs)[:, 0].numpy()
