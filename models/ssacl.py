"""SS-ACL: composes the anatomy-query ViT, the text encoder, the four self-supervised losses and the
report generator. ``forward(batch)`` returns the named losses and their weighted total.

Per step (only what the enabled losses need is run):
  text encoder on the 25 leaf names -> linear -> leaf queries; node queries = averaging matrix @ leaves
  unmasked ViT pass (with gradient): leaf / CLS / patch tokens -> ACA, LM prefix, and (detached) the
      region-reconstruction target; leaf attention maps + stem tokens + CLS + patches -> entity head
  masked ViT pass (mask_ratio): MAE, contrastive and region-reconstruction predictions
  text encoder on the reports: pooled vectors for the contrastive loss and (detached) the ACA target
A loss whose weight is 0 is neither built nor computed (DDP then sees no unused parameter).
"""
from __future__ import annotations

import torch
from torch import nn

from models.alignment import AnatomicalConsistency, ImageReportContrastive
from models.anatomy_graph import AnatomyGraph, graph_from_name
from models.entity_head import EntityHead, format_prompt
from models.location_prior import prior_bias, rest_loss
from models.mae import MAEDecoder
from models.region_recon import RegionDecoder
from models.report_decoder import build_report_decoder, generate_from_image
from models.text_encoder import TextEncoder
from models.vit import VisionTransformer

LOSSES = ("mae", "con", "region", "aca", "entity", "lm", "rest")
PRIOR_GAIN = 5.0    # leaf_spatial_prior is learned in units of 1/5 logit


class SSACL(nn.Module):
    def __init__(self, vit: VisionTransformer, text_encoder: TextEncoder, graph: AnatomyGraph,
                 weights: dict[str, float], mask_ratio: float = 0.5, threshold: float = 0.5,
                 mae_decoder: MAEDecoder | None = None, contrastive: ImageReportContrastive | None = None,
                 region_decoder: RegionDecoder | None = None, aca: AnatomicalConsistency | None = None,
                 entity_head: EntityHead | None = None, report_decoder: nn.Module | None = None,
                 spatial_prior: bool = False, location_prior: bool = False, location_prior_gain: float = 1.0):
        super().__init__()
        self.vit, self.text_encoder, self.graph = vit, text_encoder, graph
        self.mask_ratio, self.threshold = mask_ratio, threshold
        self.query_proj = nn.Linear(text_encoder.hidden_size, vit.embed_dim)
        # learned per-leaf query embedding (init 0): leaf names that read alike ("left/right lower lung
        # zone") would otherwise give near-identical queries that attend alike
        self.leaf_query_embed = nn.Parameter(torch.zeros(graph.num_leaves, vit.embed_dim))
        # optional learned spatial prior (init 0): per-leaf attention logits over the patch grid
        self.leaf_spatial_prior = (nn.Parameter(torch.zeros(graph.num_leaves, vit.num_patches))
                                   if spatial_prior else None)
        # optional report-derived location prior (models/location_prior.py): a fixed [K, L] distribution,
        # all zeros until estimated from the training data (saved in checkpoints)
        self.location_prior_gain = location_prior_gain
        if location_prior:
            self.register_buffer("location_prior", torch.zeros(graph.num_leaves, vit.num_patches))
        else:
            self.location_prior = None
        self.mae_decoder, self.contrastive, self.region_decoder = mae_decoder, contrastive, region_decoder
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
        self.register_buffer("averaging", graph.averaging_matrix.clone(), persistent=False)  # [nodes, leaves]
        self.register_buffer("leaf_node_index", graph.leaf_node_index, persistent=False)

    @classmethod
    def from_config(cls, cfg, text_tokenizer, decoder_tokenizer, graph: AnatomyGraph | None = None) -> "SSACL":
        graph = graph or graph_from_name(cfg.model.graph)
        m, w, v, al = cfg.model, cfg.loss, cfg.model.vit, cfg.model.align
        vit = VisionTransformer(cfg.data.image_size, v.patch_size, v.embed_dim, v.depth, v.num_heads, v.mlp_ratio,
                                stem=v.stem)
        init = cfg.train.get("init") or v.init
        if init:
            print(f"ViT init from {init}: {vit.load_mae_checkpoint(init)}")
        text = TextEncoder.from_config(m.text, text_tokenizer)
        D, K = v.embed_dim, graph.num_leaves
        return cls(
            vit, text, graph, weights={k: w[k] for k in LOSSES}, mask_ratio=m.mae.mask_ratio,
            threshold=m.entity.threshold,
            mae_decoder=MAEDecoder(vit.grid, v.patch_size, 3, D, m.mae.decoder_dim, m.mae.decoder_depth,
                                   m.mae.decoder_heads, v.mlp_ratio, m.mae.norm_pix_loss) if w.mae else None,
            contrastive=ImageReportContrastive(D, text.hidden_size, vit.num_patches, al.temperature,
                                               al.max_logit_scale) if w.con else None,
            region_decoder=RegionDecoder.from_graph(graph, D, decoder_dim=m.region.decoder_dim,
                                                    depth=m.region.decoder_depth, num_heads=m.region.decoder_heads,
                                                    mlp_ratio=v.mlp_ratio) if w.region else None,
            aca=AnatomicalConsistency(al.aca_identity_weight, al.aca_temperature,
                                      al.aca_text_temperature) if w.aca else None,
            entity_head=EntityHead(D, 14, K, m.entity.hidden_dim) if w.entity else None,
            report_decoder=build_report_decoder(m.decoder, decoder_tokenizer, D) if w.lm else None,
            spatial_prior=m.spatial_prior, location_prior=m.location_prior.enabled,
            location_prior_gain=m.location_prior.gain)

    # ------------------------------------------------------------------ queries
    def leaf_queries(self) -> torch.Tensor:
        """[K, D]: the text encoder's pooled embedding of each leaf name, projected to the ViT width,
        plus the leaf's learned query embedding."""
        _, pooled = self.text_encoder.encode(self.leaf_ids, self.leaf_attn)
        return self.query_proj(pooled) + self.leaf_query_embed

    def node_queries(self, leaf_queries: torch.Tensor) -> torch.Tensor:
        """[num_nodes, D]: every inner node the mean of its children, as one matmul."""
        return self.averaging.to(leaf_queries.dtype) @ leaf_queries

    @property
    def needs_location_prior(self) -> bool:
        """True when the location prior is on but not estimated yet (utils.run.ensure_location_prior)."""
        return self.location_prior is not None and not bool(self.location_prior.any())

    def query_bias(self, all_nodes: bool = False) -> torch.Tensor | None:
        """The spatial priors as ViT ``query_bias``: [K, L] for the leaves, [num_nodes, L] (children
        averaged) for every node; None when both are off. The learned one is scaled by PRIOR_GAIN so Adam
        moves it at logit pace; the report-derived one adds ``prior_bias`` once estimated."""
        terms = []
        if self.leaf_spatial_prior is not None:
            terms.append(PRIOR_GAIN * self.leaf_spatial_prior)
        if self.location_prior is not None:  # estimated before training (utils.run.ensure_location_prior)
            terms.append(prior_bias(self.location_prior, self.location_prior_gain))
        if not terms:
            return None
        bias = sum(terms)
        return self.averaging.to(bias.dtype) @ bias if all_nodes else bias

    def _anatomies(self, batch, B: int, device) -> torch.Tensor:
        """[B, K] bool: the leaves of each report's findings (all False for a normal study)."""
        anat = batch.get("anatomies")
        K = self.graph.num_leaves
        if anat is None or anat.shape[-1] != K:
            return torch.zeros(B, K, dtype=torch.bool, device=device)
        return anat.to(device).bool()

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        B, on = images.shape[0], self.weights
        if "lm" in on:  # teacher forcing: the prompt of the reference labels (reads them before any GPU work is queued)
            labels = batch.get("labels")
            prompts = EntityHead.prompt(labels, self.threshold) if labels is not None else [format_prompt([])] * B
        leaf_q = self.leaf_queries()
        all_nodes = "region" in on
        queries = self.node_queries(leaf_q) if all_nodes else leaf_q
        qbias = self.query_bias(all_nodes)
        losses: dict[str, torch.Tensor] = {}

        if on.keys() & {"region", "aca", "entity", "lm", "rest"}:
            u = self.vit(images, queries, return_attn=bool(on.keys() & {"entity", "rest"}), query_bias=qbias)
            leaf_u = u["queries"][:, self.leaf_node_index] if all_nodes else u["queries"]
            if on.keys() & {"entity", "rest"}:
                leaf_attn = u["attn"][:, self.leaf_node_index] if all_nodes else u["attn"]
        if on.keys() & {"mae", "con", "region"}:
            mk = self.vit(images, queries, mask_ratio=self.mask_ratio, query_bias=qbias)
        if on.keys() & {"con", "aca"}:
            _, text = self.text_encoder.encode_texts(batch["report"], images.device)

        if "mae" in on:
            pred = self.mae_decoder(mk["cls"], mk["patches"], mk["ids_restore"])
            losses["mae"] = self.mae_decoder.loss(images, pred, mk["mask"])
        if "con" in on:
            losses["con"] = self.contrastive(mk["patches"], text, mk["mask"])
        if "region" in on:
            losses["region"] = self.region_decoder(mk["queries"], u["queries"].detach())
        if "aca" in on:
            losses["aca"] = self.aca(leaf_u, text.detach())
        if "entity" in on:
            obs, anat = self.entity_head(u["cls"], u["patches"], u["local"], leaf_attn)
            losses["entity"] = self.entity_head.loss(obs, anat, batch["labels"], self._anatomies(batch, B, images.device))
        if "rest" in on:
            losses["rest"] = rest_loss(leaf_attn, self.location_prior, self._anatomies(batch, B, images.device))
        if "lm" in on:
            visual = torch.cat([leaf_u, u["cls"][:, None], u["patches"]], dim=1)
            vmask = torch.cat([EntityHead.leaves_shown(self._anatomies(batch, B, images.device)),
                               torch.ones(B, 1 + u["patches"].shape[1], dtype=torch.bool, device=images.device)], 1)
            losses["lm"] = self.report_decoder(visual, vmask, prompts, batch["report"])
        losses["loss"] = sum(w * losses[k].float() for k, w in on.items()) if on else images.new_zeros(())
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, batch: dict, beam_size: int = 1, max_new_tokens: int = 100, min_new_tokens: int = 0,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0) -> list[dict]:
        """Reports from the images alone: the entity head predicts the prompt's observations and the
        anatomy leaves the decoder sees (never read from the batch's report / labels / anatomies).
        Without an entity head (loss.entity = 0) every leaf is on and the prompt is "Findings: none."."""
        if self.report_decoder is None:
            raise ValueError("generate needs the report decoder (loss.lm > 0)")
        images = batch["image"]
        out = self.vit(images, self.leaf_queries(), return_attn=self.entity_head is not None,
                       query_bias=self.query_bias())
        kw = dict(beam_size=beam_size, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                  repetition_penalty=repetition_penalty, length_penalty=length_penalty)
        if self.entity_head is not None:
            rows = generate_from_image(self.report_decoder, self.entity_head, out["cls"], out["queries"],
                                       out["patches"], out["local"], out["attn"], self.graph.leaf_names,
                                       self.threshold, **kw)
        else:
            B = images.shape[0]
            visual = torch.cat([out["queries"], out["cls"][:, None], out["patches"]], dim=1)
            vmask = torch.ones(visual.shape[:2], dtype=torch.bool, device=images.device)
            reports = self.report_decoder.generate(visual, vmask, [format_prompt([])] * B, **kw)
            rows = [{"report": r, "entities": [], "anatomies": list(self.graph.leaf_names)} for r in reports]
        return [{"id": i, **r} for i, r in zip(batch["id"], rows)]

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W] in [0, 1]: each leaf query's last-layer attention to the patches (heads
        averaged), upsampled to the image and smoothed by models/heatmaps.py."""
        from models.heatmaps import leaf_heatmaps
        attn = self.vit(images, self.leaf_queries(), return_attn=True, query_bias=self.query_bias())["attn"]
        return leaf_heatmaps(attn.float(), self.vit.grid, tuple(images.shape[-2:]))

    def no_weight_decay(self) -> set[str]:
        """Token / scale parameters kept out of weight decay (lr_sched.param_groups also finds them by name)."""
        names = {"vit.cls_token", "mae_decoder.mask_token", "contrastive.logit_scale", "entity_head.anat_bias",
                 "leaf_query_embed", "leaf_spatial_prior"}
        own = dict(self.named_parameters())
        return {n for n in names if n in own}
