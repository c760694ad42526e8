"""SS-ACL: composes the anatomy-query ViT, the text encoder, the self-supervised losses and the
report generator. ``forward(batch)`` returns the named losses and their weighted total;
``generate(batch)`` and ``heatmaps(images)`` read the image alone.

One training step runs only what the enabled losses (weight > 0) need:
  queries     text encoder on the leaf names -> linear -> leaf queries [K, D]; node queries [N, D]
  unmasked    ViT pass with every query -> ACA, entity head, LM prefix, region target (detached)
  masked      ViT pass with mask_ratio -> MAE, contrastive, region prediction
  reports     text encoder on the reports -> pooled vectors [B, Dt] for contrastive and ACA
A loss whose weight is 0 is neither built nor computed (DDP then sees no unused parameter).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from datasets.tokenizer import checkpoint_tokenizers, load_tokenizer
from models.alignment import AnatomicalConsistency, ImageReportContrastive
from models.entity_head import EntityHead, format_prompt
from models.heatmaps import leaf_heatmaps
from models.location_prior import estimate_location_prior, prior_bias, rest_loss
from models.mae import MAEDecoder
from models.region_recon import RegionDecoder
from models.report_decoder import build_report_decoder, visual_prefix
from models.text_encoder import TextEncoder
from models.vit import VisionTransformer
from utils.checkpoint import count_parameters
from utils.config import differences, with_defaults
from vocab.anatomy_graph import AnatomyGraph, graph_from_name

LOSSES = ("mae", "con", "region", "aca", "entity", "lm", "rest")
PRIOR_GAIN = 5.0  # leaf_spatial_prior is learned in units of 1/5 logit
UNMASKED_LOSSES = {"region", "aca", "entity", "lm", "rest"}
MASKED_LOSSES = {"mae", "con", "region"}
REPORT_LOSSES = {"con", "aca"}
ATTENTION_LOSSES = {"entity", "rest"}


class SSACL(nn.Module):
    def __init__(
        self,
        vit: VisionTransformer,
        text_encoder: TextEncoder,
        graph: AnatomyGraph,
        weights: dict[str, float],
        mask_ratio: float = 0.5,
        threshold: float = 0.5,
        mae_decoder: MAEDecoder | None = None,
        contrastive: ImageReportContrastive | None = None,
        region_decoder: RegionDecoder | None = None,
        aca: AnatomicalConsistency | None = None,
        entity_head: EntityHead | None = None,
        report_decoder: nn.Module | None = None,
        spatial_prior: bool = False,
        location_prior: bool = False,
        location_prior_gain: float = 1.0,
    ):
        super().__init__()
        self.vit, self.text_encoder, self.graph = vit, text_encoder, graph
        self.mask_ratio, self.threshold = mask_ratio, threshold
        self.query_proj = nn.Linear(text_encoder.hidden_size, vit.embed_dim)
        # per-leaf query embedding (init 0): names that read alike would otherwise attend alike
        self.leaf_query_embed = nn.Parameter(torch.zeros(graph.num_leaves, vit.embed_dim))
        # optional learned per-leaf attention logits over the patch grid [K, L] (init 0)
        self.leaf_spatial_prior = (
            nn.Parameter(torch.zeros(graph.num_leaves, vit.num_patches)) if spatial_prior else None
        )
        # optional report-derived location prior [K, L]: zeros until estimated (fit_location_prior)
        self.location_prior_gain = location_prior_gain
        if location_prior:
            self.register_buffer("location_prior", torch.zeros(graph.num_leaves, vit.num_patches))
        else:
            self.location_prior = None
        self.mae_decoder, self.contrastive, self.region_decoder = (
            mae_decoder,
            contrastive,
            region_decoder,
        )
        self.aca, self.entity_head, self.report_decoder = aca, entity_head, report_decoder
        self.weights = {k: float(w) for k, w in weights.items() if w}  # the enabled terms
        owner = {"mae": mae_decoder, "con": contrastive, "region": region_decoder, "aca": aca,
                 "entity": entity_head, "lm": report_decoder, "rest": self.location_prior}
        for k in self.weights:
            if k not in owner:
                raise ValueError(f"unknown loss {k!r} (known: {', '.join(LOSSES)})")
            if owner[k] is None:
                what = "model.location_prior is off" if k == "rest" else "its module was not given"
                raise ValueError(f"loss {k!r} has weight {self.weights[k]} but {what}")
        ids, attn = text_encoder.tokenize(graph.leaf_names)
        self.register_buffer("leaf_ids", ids, persistent=False)
        self.register_buffer("leaf_attn", attn, persistent=False)
        # [N, K]
        self.register_buffer("averaging", graph.averaging_matrix.clone(), persistent=False)
        self.register_buffer("leaf_node_index", graph.leaf_node_index, persistent=False)

    @classmethod
    def from_config(
        cls, cfg, text_tokenizer, decoder_tokenizer, graph: AnatomyGraph | None = None
    ) -> SSACL:
        graph = graph or graph_from_name(cfg.model.graph)
        m, w, v, al = cfg.model, cfg.loss, cfg.model.vit, cfg.model.align
        vit = VisionTransformer(
            cfg.data.image_size,
            v.patch_size,
            v.embed_dim,
            v.depth,
            v.num_heads,
            v.mlp_ratio,
            stem=v.stem,
        )
        if v.init:
            print(f"ViT init from {v.init}: {vit.load_mae_checkpoint(v.init)}")
        text = TextEncoder.from_config(m.text, text_tokenizer)
        D, K = v.embed_dim, graph.num_leaves
        mae = m.mae
        return cls(
            vit,
            text,
            graph,
            weights={k: w[k] for k in LOSSES},
            mask_ratio=mae.mask_ratio,
            threshold=m.entity.threshold,
            mae_decoder=MAEDecoder(
                vit.grid,
                v.patch_size,
                3,
                D,
                mae.decoder_dim,
                mae.decoder_depth,
                mae.decoder_heads,
                v.mlp_ratio,
                mae.norm_pix_loss,
            )
            if w.mae
            else None,
            contrastive=ImageReportContrastive(
                D, text.hidden_size, vit.num_patches, al.temperature, al.max_logit_scale
            )
            if w.con
            else None,
            region_decoder=RegionDecoder.from_graph(
                graph,
                D,
                decoder_dim=m.region.decoder_dim,
                depth=m.region.decoder_depth,
                num_heads=m.region.decoder_heads,
                mlp_ratio=v.mlp_ratio,
            )
            if w.region
            else None,
            aca=AnatomicalConsistency(
                al.aca_identity_weight, al.aca_temperature, al.aca_text_temperature
            )
            if w.aca
            else None,
            entity_head=EntityHead(D, 14, K, m.entity.hidden_dim) if w.entity else None,
            report_decoder=build_report_decoder(m.decoder, decoder_tokenizer, D) if w.lm else None,
            spatial_prior=m.spatial_prior,
            location_prior=m.location_prior.enabled,
            location_prior_gain=m.location_prior.gain,
        )

    @classmethod
    def from_checkpoint(cls, path, cfg, device) -> SSACL:
        """The SSACL of a checkpoint, for evaluation / prediction: architecture (model, loss
        weights, image size) and tokenizers from the checkpoint and its run dir, weights loaded
        strictly. ``cfg`` is updated in place with those sections (data paths and eval settings
        stay the caller's); a model key newer than the checkpoint takes its default."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved, source = ckpt["config"], f"{path} (its stored config)"
        stored = {"model": with_defaults("model", saved["model"], source),
                  "loss": with_defaults("loss", saved["loss"], source)}
        ignored = differences({k: cfg[k] for k in stored}, stored)
        if ignored:
            print(
                f"{path}: the checkpoint's model and loss settings are used; ignored: "
                + ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, mine, theirs in ignored)
            )
        cfg.model, cfg.loss = stored["model"], stored["loss"]
        cfg.data.image_size = saved["data"]["image_size"]
        cfg.model.vit.init = None  # the checkpoint holds the weights
        folders = checkpoint_tokenizers(path)
        model = cls.from_config(
            cfg, load_tokenizer(folders["text"]), load_tokenizer(folders["decoder"])
        )
        model.load_state_dict(ckpt["model"])
        print(f"loaded {Path(path)} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}): "
              f"{count_parameters(model)}")
        return model.to(device)

    # ------------------------------------------------------------------ queries and priors
    @property
    def leaf_names(self) -> tuple[str, ...]:
        return self.graph.leaf_names

    def leaf_queries(self) -> torch.Tensor:
        """[K, D]: the text encoder's pooled embedding of each leaf name, projected to the ViT
        width, plus the leaf's learned query embedding."""
        _, pooled = self.text_encoder.encode(self.leaf_ids, self.leaf_attn)
        return self.query_proj(pooled) + self.leaf_query_embed

    def node_queries(self, leaf_queries: torch.Tensor) -> torch.Tensor:
        """[N, D]: every inner node the mean of its children, as one matmul."""
        return self.averaging.to(leaf_queries.dtype) @ leaf_queries

    @property
    def needs_location_prior(self) -> bool:
        """True when the location prior is on but not estimated yet."""
        return self.location_prior is not None and not bool(self.location_prior.any())

    @torch.no_grad()
    def fit_location_prior(self, batches) -> None:
        """Estimate the location prior from training batches ("image", "anatomies"), summed over
        ranks."""
        prior = estimate_location_prior(batches, self.graph.num_leaves, self.vit.img_size,
                                        self.vit.patch_size, self.location_prior.device)
        self.location_prior.copy_(prior)

    def prior_heatmaps(self, image_size: tuple[int, int]) -> torch.Tensor | None:
        """[1, K, H, W]: the location prior drawn as heatmaps (the same for every image); None when
        off."""
        if self.location_prior is None:
            return None
        return leaf_heatmaps(self.location_prior[None].float().cpu(), self.vit.grid, image_size)

    def query_bias(self, all_nodes: bool = False) -> torch.Tensor | None:
        """The spatial priors as ViT ``query_bias``: [K, L] for the leaves, [N, L] (children
        averaged) for every node; None when both are off. The learned one is scaled by PRIOR_GAIN
        so Adam moves it at logit pace; the report-derived one adds ``prior_bias`` once
        estimated."""
        terms = []
        if self.leaf_spatial_prior is not None:
            terms.append(PRIOR_GAIN * self.leaf_spatial_prior)
        if self.location_prior is not None:
            terms.append(prior_bias(self.location_prior, self.location_prior_gain))
        if not terms:
            return None
        bias = sum(terms)
        return self.averaging.to(bias.dtype) @ bias if all_nodes else bias

    def _finding_leaves(self, batch, batch_size: int, device) -> torch.Tensor:
        """[B, K] bool: the leaves of each report's findings (all False for a normal study)."""
        anatomies = batch.get("anatomies")
        if anatomies is None or anatomies.shape[-1] != self.graph.num_leaves:
            return torch.zeros(batch_size, self.graph.num_leaves, dtype=torch.bool, device=device)
        return anatomies.to(device).bool()

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        B, enabled = images.shape[0], self.weights.keys()
        if "lm" in enabled:  # the reference labels' prompt, read before any GPU work is queued
            labels = batch.get("labels")
            prompts = (
                EntityHead.prompt(labels, self.threshold)
                if labels is not None
                else [format_prompt([])] * B
            )
        finding_leaves = self._finding_leaves(batch, B, images.device)
        all_nodes = "region" in enabled
        leaf_queries = self.leaf_queries()
        queries = self.node_queries(leaf_queries) if all_nodes else leaf_queries
        bias = self.query_bias(all_nodes)
        losses: dict[str, torch.Tensor] = {}

        if enabled & UNMASKED_LOSSES:
            unmasked = self.vit(
                images, queries, return_attn=bool(enabled & ATTENTION_LOSSES), query_bias=bias
            )
            # [B, K, D], [B, K, L]
            leaf_tokens, leaf_attn = unmasked["queries"], unmasked.get("attn")
            if all_nodes:
                leaf_tokens = leaf_tokens[:, self.leaf_node_index]
                leaf_attn = leaf_attn[:, self.leaf_node_index] if leaf_attn is not None else None
        if enabled & MASKED_LOSSES:
            masked = self.vit(images, queries, mask_ratio=self.mask_ratio, query_bias=bias)
        if enabled & REPORT_LOSSES:
            _, report_vectors = self.text_encoder.encode_texts(batch["report"], images.device)

        if "mae" in enabled:
            pred = self.mae_decoder(masked["cls"], masked["patches"], masked["ids_restore"])
            losses["mae"] = self.mae_decoder.loss(images, pred, masked["mask"])
        if "con" in enabled:
            losses["con"] = self.contrastive(masked["patches"], report_vectors, masked["mask"])
        if "region" in enabled:
            losses["region"] = self.region_decoder(masked["queries"], unmasked["queries"].detach())
        if "aca" in enabled:
            losses["aca"] = self.aca(leaf_tokens, report_vectors.detach())
        if "entity" in enabled:
            obs, anat = self.entity_head(
                unmasked["cls"], unmasked["patches"], unmasked["local"], leaf_attn
            )
            losses["entity"] = self.entity_head.loss(obs, anat, batch["labels"], finding_leaves)
        if "rest" in enabled:
            losses["rest"] = rest_loss(leaf_attn, self.location_prior, finding_leaves)
        if "lm" in enabled:
            shown = EntityHead.leaves_shown(finding_leaves)
            visual, visual_mask = visual_prefix(
                leaf_tokens, unmasked["cls"], unmasked["patches"], shown,
                cls_visible=self.report_decoder.cls_visible,
            )
            losses["lm"] = self.report_decoder(visual, visual_mask, prompts, batch["report"])
        losses["loss"] = sum(
            (w * losses[k].float() for k, w in self.weights.items()), images.new_zeros(())
        )
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, batch: dict, **decoding) -> list[dict]:
        """Reports from the images alone: the entity head predicts the prompt's observations and the
        anatomy leaves the decoder sees (never read from the batch's report / labels / anatomies).
        Without an entity head (loss.entity = 0) every leaf is on and the prompt is "Findings:
        none.". ``decoding``: the report decoder's generate options (beam_size, max_new_tokens,
        ...). Returns [{"id", "report", "entities", "anatomies"}] per image."""
        if self.report_decoder is None:
            raise ValueError("generate needs the report decoder (loss.lm > 0)")
        images = batch["image"]
        B = images.shape[0]
        out = self.vit(images, self.leaf_queries(), return_attn=self.entity_head is not None,
                       query_bias=self.query_bias())
        if self.entity_head is not None:
            obs_logits, anat_logits = self.entity_head(
                out["cls"], out["patches"], out["local"], out["attn"]
            )
            entities, shown = self.entity_head.predict(obs_logits, anat_logits, self.threshold)
        else:
            entities = [[] for _ in range(B)]
            shown = torch.ones(B, self.graph.num_leaves, dtype=torch.bool, device=images.device)
        visual, visual_mask = visual_prefix(out["queries"], out["cls"], out["patches"], shown,
                                            cls_visible=self.report_decoder.cls_visible)
        reports = self.report_decoder.generate(
            visual, visual_mask, [format_prompt(e) for e in entities], **decoding
        )
        return [{"id": i, "report": r, "entities": e,
                 "anatomies": [n for n, on in zip(self.leaf_names, leaves) if on]}
                for i, r, e, leaves in zip(batch["id"], reports, entities, shown.tolist())]

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W] in [0, 1]: each leaf query's last-layer attention to the patches (heads
        averaged), upsampled to the image and smoothed (models/heatmaps.py)."""
        attn = self.vit(
            images, self.leaf_queries(), return_attn=True, query_bias=self.query_bias()
        )["attn"]
        return leaf_heatmaps(attn.float(), self.vit.grid, tuple(images.shape[-2:]))

    def lr_scales(self, lm_scale: float) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier (the LM's
        ``model.decoder.lr_scale``)."""
        return {"report_decoder.lm.": lm_scale}
