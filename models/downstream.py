"""Downstream models around the SS-ACL ViT (no anatomy queries: CLS and patch tokens only).

Classifier: pooled tokens (mean of the patch tokens, as the official global pool; or CLS; or both)
-> LayerNorm -> linear head, BCE over the labels. Segmenter: the patch-token grid -> 1x1 conv ->
log2(patch) stages of (2x upsampling, 3x3 conv, GroupNorm, GELU) -> one mask logit per pixel,
BCE + soft Dice. ``linear_probe`` freezes the encoder (kept in eval mode, run without gradient):
only the head (or decoder) trains, as the official ``freeze_backbone``.

The encoder comes from an SS-ACL checkpoint (its ``vit.*`` weights and its ViT sizes), from an MAE
ViT state_dict (timm / MAE names; the MAE decoder, mask token and position table are not used),
or is left at random init (the baseline). The fixed sin-cos position table is rebuilt for the
downstream image size, so any resolution that the patch size divides loads.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.vit import LayerNorm, VisionTransformer
from utils.checkpoint import PartialLoadReport, load_partial, read_checkpoint
from utils.config import differences, with_defaults

POOLINGS = ("mean", "cls", "cls_mean")
# checkpoint keys of an encoder that a downstream ViT never uses: why they are skipped
UNUSED = {"decoder_": "MAE decoder", "mask_token": "MAE mask token",
          "pos_embed": "fixed sin-cos position table, rebuilt", "local_embed.": "per-patch stem of the "
          "leaves' evidence (two_scale), not used downstream"}


def build_vit(vit_cfg, image_size: int) -> VisionTransformer:
    """A randomly initialised ViT of ``model.vit`` sizes at ``image_size`` (3 input channels, as
    pretraining), without the leaves' per-patch stem."""
    v = vit_cfg
    vit = VisionTransformer(image_size, v.patch_size, v.embed_dim, v.depth, v.num_heads,
                            v.mlp_ratio, stem=v.stem)
    vit.local_embed = None
    return vit


class DownstreamModel(nn.Module):
    """The encoder part shared by the classifier and the segmenter."""

    def __init__(self, vit: VisionTransformer, linear_probe: bool = False):
        super().__init__()
        vit.local_embed = None
        self.vit, self.linear_probe = vit, linear_probe
        if linear_probe:
            self.vit.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear_probe:
            self.vit.eval()
        return self

    def encode(self, images: torch.Tensor) -> dict:
        """[B, 1 or 3, H, W] images -> the ViT's cls [B, D] and patches [B, L, D]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.no_grad() if self.linear_probe else contextlib.nullcontext():
            return self.vit(images)

    def lr_scales(self, lm_scale: float = 1.0) -> dict[str, float]:
        return {}


class Classifier(DownstreamModel):
    def __init__(self, vit: VisionTransformer, num_classes: int, pooling: str = "mean",
                 linear_probe: bool = False):
        super().__init__(vit, linear_probe)
        if pooling not in POOLINGS:
            raise ValueError(f"finetune.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        dim = vit.embed_dim * (2 if pooling == "cls_mean" else 1)
        self.fc_norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as the official fine-tuning
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encode(images)
        parts = {"cls": [out["cls"]], "mean": [out["patches"].mean(1)],
                 "cls_mean": [out["cls"], out["patches"].mean(1)]}[self.pooling]
        return self.fc_norm(torch.cat(parts, dim=-1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] label logits."""
        return self.head(self.features(images))

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch["image"]).float()
        return {"loss": F.binary_cross_entropy_with_logits(logits, batch["labels"].float())}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) pooled over the batch (stable when masks are empty)."""
    p = logits.float().sigmoid()
    t = target.float()
    return 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


class Segmenter(DownstreamModel):
    def __init__(self, vit: VisionTransformer, decoder_dim: int = 64, linear_probe: bool = False):
        super().__init__(vit, linear_probe)
        self.proj = nn.Conv2d(vit.embed_dim, decoder_dim, 1)
        layers, c = [], decoder_dim
        for _ in range(max(int(math.log2(vit.patch_size)), 0)):
            w = max(c // 2, 16)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(min(8, w), w), nn.GELU()]
            c = w
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, 1, 1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] mask logits at the images' size."""
        patches = self.encode(images)["patches"]
        g = self.vit.grid
        x = patches.transpose(1, 2).reshape(patches.shape[0], -1, *g)
        x = self.out(self.up(self.proj(x)))
        if x.shape[-2:] != images.shape[-2:]:
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return x

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch["image"]).float()
        mask = batch["mask"].float()
        bce = F.binary_cross_entropy_with_logits(logits, mask)
        dice = soft_dice_loss(logits, mask)
        return {"loss": bce + dice, "bce": bce, "dice_loss": dice}


def read_encoder(path, what: str = "train.pretrained") -> tuple[dict, dict | None]:
    """(ViT state_dict in timm / MAE names, the SS-ACL checkpoint's stored config or None) of an
    SS-ACL checkpoint (its ``vit.*`` entries) or an MAE ViT state_dict (bare, or under "model" /
    "state_dict"; "module." stripped)."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # MAE stores its arguments
        ckpt = read_checkpoint(path, what, required=())
    state = ckpt
    for k in ("model", "state_dict"):
        if isinstance(ckpt.get(k), dict):
            state = ckpt[k]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("vit.") for k in state):
        vit = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
        return vit, ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    return state, None


def load_encoder(vit: VisionTransformer, state: dict, path, allow_partial: bool = False
                 ) -> PartialLoadReport:
    """Put ``state`` (``read_encoder``) into ``vit``. Keys a downstream ViT never uses (UNUSED)
    are skipped; a ViT key left unfilled or a checkpoint key that does not map (unknown or of
    another shape) is an error naming them unless ``allow_partial`` (train.allow_partial)."""
    prefix_map = {k: None for k in UNUSED}
    report = load_partial(vit, state, prefix_map)
    unmapped = {}
    for key, why in report.skipped.items():
        known = next((v for k, v in UNUSED.items() if key.startswith(k)), None)
        if known:
            report.skipped[key] = known
        else:
            unmapped[key] = why
    if (report.missing or unmapped) and not allow_partial:
        raise ValueError(f"{path}: does not fill the ViT (train.allow_partial=false): ViT keys "
                         f"missing {report.missing[:12]}; checkpoint keys not mapped "
                         f"{dict(list(unmapped.items())[:12])}")
    return report


def encoder_from_pretrained(path, cfg, allow_partial: bool = False) -> VisionTransformer:
    """The ViT of ``path`` at cfg.data.image_size. An SS-ACL checkpoint brings its ViT sizes
    (cfg.model.vit is set to them, differences printed); an MAE state_dict must match
    cfg.model.vit."""
    state, saved = read_encoder(path)
    if saved is not None and "model" in saved:
        stored = with_defaults("model", saved["model"], f"{path} (its stored config)").vit
        stored.init = None
        changed = differences(dict(cfg.model.vit), dict(stored))
        if changed:
            print(f"{path}: the checkpoint's ViT sizes are used: "
                  + ", ".join(f"model.vit.{k}={theirs!r} (config: {mine!r})" for k, mine, theirs in changed))
        cfg.model.vit = stored
    vit = build_vit(cfg.model.vit, cfg.data.image_size)
    print(f"encoder from {path} ({'SS-ACL' if saved else 'MAE'}): "
          f"{load_encoder(vit, state, path, allow_partial)}")
    return vit


def build_model(cfg, num_classes: int, segmentation: bool, vit: VisionTransformer | None = None
                ) -> DownstreamModel:
    """The classifier (``num_classes`` labels) or segmenter of cfg.finetune around ``vit``
    (random init of cfg.model.vit when None)."""
    f = cfg.finetune
    vit = vit if vit is not None else build_vit(cfg.model.vit, cfg.data.image_size)
    probe = f.mode == "linear_probe"
    if segmentation:
        return Segmenter(vit, f.decoder_dim, probe)
    return Classifier(vit, num_classes, f.pooling, probe)


def from_pretrained(path, cfg, num_classes: int, segmentation: bool) -> DownstreamModel:
    """The downstream model with its encoder from ``path`` (SS-ACL or MAE; None = random init)."""
    vit = encoder_from_pretrained(path, cfg, cfg.train.allow_partial) if path else None
    return build_model(cfg, num_classes, segmentation, vit)


def from_finetuned(path, cfg) -> DownstreamModel:
    """The fine-tuned model of a main_finetune.py checkpoint, loaded strictly: ViT sizes, image size
    and cfg.finetune's model settings come from its stored config (cfg is updated in place)."""
    ckpt = read_checkpoint(path, "--checkpoint", ("model", "config"))
    saved, state = ckpt["config"], ckpt["model"]
    if "finetune" not in saved or not any(k.startswith(("head.", "out.")) for k in state):
        raise ValueError(f"--checkpoint {path}: not a main_finetune.py checkpoint (no finetune "
                         "config or no classification head / segmentation decoder)")
    source = f"{path} (its stored config)"
    cfg.model.vit = with_defaults("model", saved["model"], source).vit
    stored = with_defaults("finetune", saved["finetune"], source)
    for key in ("mode", "pooling", "decoder_dim"):
        cfg.finetune[key] = stored[key]
    cfg.data.image_size = saved["data"]["image_size"]
    segmentation = "out.weight" in state
    num_classes = 1 if segmentation else int(state["head.weight"].shape[0])
    model = build_model(cfg, num_classes, segmentation)
    model.load_state_dict(state)
    print(f"loaded {path} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})")
    return model
