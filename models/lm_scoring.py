"""Image-conditioned text likelihoods from SSACL's report decoder: a second zero-shot read-out beside
the contrastive embeddings (models/embeddings.py), for checkpoints whose contrastive head learned
little (it needs many more steps than the LM).

log p(text | image) is the report decoder's teacher-forced log-probability of the text's tokens as
the beginning of the report, after the visual prefix exactly as ``SSACL.generate`` builds it (the
leaves the entity head predicts, every leaf without one) and no entity prompt (the prompt-dropout
half of training). The report's end token is not scored: a prompt is one sentence of a report.
Texts are written as the reports are: first letter upper case, a final period.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.report_decoder import visual_prefix


def require_decoder(model, source: str) -> None:
    if model.report_decoder is None:
        raise ValueError(f"{source}: the model has no report decoder (loss.lm.weight=0): "
                         "zeroshot.scorer=lm is undefined for it")


def as_sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


@torch.no_grad()
def visual_inputs(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's visual tokens [B, V, D] and their mask [B, V] for these images (as generate)."""
    out = model.vit(model.encoder_images(images), model.leaf_queries(),
                    return_attn=model.entity_head is not None, query_bias=model.query_bias())
    if model.entity_head is not None:
        obs, anat = model.entity_head(out["cls"], out["patches"], out["local"], out["attn"])
        shown = model.entity_head.predict(obs, anat)[1]
    else:
        shown = torch.ones(images.shape[0], model.graph.num_leaves, dtype=torch.bool,
                           device=images.device)
    dec = model.report_decoder
    return visual_prefix(out["queries"], out["cls"], model.lm_patches(out["patches"]), shown,
                         cls_visible=dec.cls_visible)


@torch.no_grad()
def text_log_likelihoods(model, visual: torch.Tensor, visual_mask: torch.Tensor, texts: list[str],
                         chunk: int = 1024) -> torch.Tensor:
    """[B, T]: log p(text t | image b), summed over t's tokens, for every image and text."""
    dec = model.report_decoder
    ids = dec.report_ids([as_sentence(t) for t in texts])
    B, T = visual.shape[0], len(ids)
    out = torch.empty(B * T, device=visual.device)
    pairs = [(b, t) for b in range(B) for t in range(T)]
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        rows = torch.tensor([b for b, _ in part], device=visual.device)
        text_rows = [ids[t] for _, t in part]
        logits, tgt = dec.teacher_forced(visual[rows], visual_mask[rows],
                                         [dec.prefix_ids(None)] * len(part), text_rows)
        for i, r in enumerate(text_rows):  # the end token is not part of a sentence prompt
            tgt[i, len(r)] = -100
        nll = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=-100,
                              reduction="none")
        out[s:s + len(part)] = -nll.sum(1)
    return out.view(B, T)
