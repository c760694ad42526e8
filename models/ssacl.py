"""SS-ACL: composes the anatomy-query ViT, the text encoder, the self-supervised losses and the report
generator. ``forward(batch)`` returns the named losses and their weighted total; ``generate(batch)``
and ``heatmaps(images)`` read the image alone.

One training step runs only what the enabled losses (weight > 0) need:
  queries   the text encoder on the leaf names -> linear -> leaf queries [K, D]; node queries [N, D]
  unmasked  a ViT pass with the queries -> ACA, entity head, LM prefix, region target
  masked    a ViT pass with mask_ratio -> MAE, contrastive, region prediction
  reports   the text encoder on the reports -> pooled vectors [B, Dt] for contrastive and ACA
Images may come at ``sr`` times the encoder's size (data.sr_scale): the MAE target; every encoder
pass reads their resize. A loss whose weight is 0 is neither built nor computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datasets.tokenizer import checkpoint_tokenizers
from models.consistency import AnatomicalConsistency
from models.contrastive import ImageReportContrastive
from models.entity_head import EntityHead, format_prompt
from models.heatmaps import leaf_heatmaps
from models.location_prior import estimate_location_prior, prior_bias, rest_loss
from models.mae import MAEDecoder
from models.region_recon import PixelRegionReconstruction, RegionDecoder
from models.report_decoder import build_report_decoder, visual_prefix
from models.text_encoder import TextEncoder
from models.vit import VisionTransformer
from utils.checkpoint import count_parameters, read_checkpoint
from utils.config import differences, with_defaults
from utils.seed import sample_noise
from vocab.anatomy_graph import AnatomyGraph, graph_from_name

LOSSES = ("mae", "con", "region", "aca", "entity", "lm", "rest")
PRIOR_GAIN = 5.0  # leaf_spatial_prior is learned in units of 1/5 logit
UNMASKED_LOSSES = {"region", "aca", "entity", "lm", "rest"}
MASKED_LOSSES = {"mae", "con", "region"}
REPORT_LOSSES = {"con", "aca"}
ATTENTION_LOSSES = {"entity", "rest"}
# state-dict entries whose last dimension is the patch grid (row-major), resized to another grid on load
GRID_SHAPED = ("contrastive.pos_weight.weight", "location_prior", "leaf_spatial_prior")


class SSACL(nn.Module):
    def __init__(self, vit: VisionTransformer, text_encoder: TextEncoder, graph: AnatomyGraph,
                 weights: dict[str, float], mask_ratio: float = 0.5, threshold: float = 0.5,
                 modules: dict[str, nn.Module] | None = None, temperature: float | None = None,
                 leaf_query_embed: bool = False, spatial_prior: bool = False,
                 location_prior: bool = False, location_prior_gain: float = 1.0, prefix_grid: int = 0,
                 evidence_inputs: tuple[str, ...] = ()):
        """``modules``: the loss modules by name ("mae_decoder", "contrastive", "region", "aca",
        "entity_head", "report_decoder"), those of disabled losses absent; ``temperature``: T of
        the shared scale Tpar = 1/T (learnable) that the official contrastive and ACA forms use;
        ``prefix_grid`` g > 0: the LM reads the patch tokens average-pooled to g x g (a prefix of
        bounded length at any resolution), 0: every patch; ``evidence_inputs``: the losses ("aca",
        "region") that read the queries' evidence (their last-layer attention readout of the patch
        tokens) instead of their output tokens (loss.<term>.input)."""
        super().__init__()
        self.vit, self.text_encoder, self.graph = vit, text_encoder, graph
        self.mask_ratio, self.threshold, self.prefix_grid = mask_ratio, threshold, prefix_grid
        self.evidence_inputs = set(evidence_inputs)
        modules = modules or {}
        self.mae_decoder = modules.get("mae_decoder")
        self.contrastive, self.region = modules.get("contrastive"), modules.get("region")
        self.aca, self.entity_head = modules.get("aca"), modules.get("entity_head")
        self.report_decoder = modules.get("report_decoder")
        self.tpar = nn.Parameter(torch.tensor(1.0 / temperature)) if temperature else None
        self.query_proj = nn.Linear(text_encoder.hidden_size, vit.embed_dim)
        # per-leaf query embedding (init 0): names that read alike would otherwise attend alike
        self.leaf_query_embed = (nn.Parameter(torch.zeros(graph.num_leaves, vit.embed_dim))
                                 if leaf_query_embed else None)
        # optional learned per-leaf attention logits over the patch grid [K, L] (init 0)
        self.leaf_spatial_prior = (nn.Parameter(torch.zeros(graph.num_leaves, vit.num_patches))
                                   if spatial_prior else None)
        # optional report-derived location prior [K, L]: zeros until estimated (fit_location_prior)
        self.location_prior_gain = location_prior_gain
        self.register_buffer("location_prior", torch.zeros(graph.num_leaves, vit.num_patches)
                             if location_prior else None)
        self.weights = {k: float(w) for k, w in weights.items() if w}  # the enabled terms
        self._check_losses()
        ids, attn = text_encoder.tokenize(graph.leaf_names)
        self.register_buffer("leaf_ids", ids, persistent=False)
        self.register_buffer("leaf_attn", attn, persistent=False)
        self.register_buffer("averaging", graph.averaging_matrix.clone(), persistent=False)  # [N, K]
        self.register_buffer("leaf_node_index", graph.leaf_node_index, persistent=False)

    def _check_losses(self) -> None:
        owner = {"mae": self.mae_decoder, "con": self.contrastive, "region": self.region,
                 "aca": self.aca, "entity": self.entity_head, "lm": self.report_decoder,
                 "rest": self.location_prior}
        for k, w in self.weights.items():
            if k not in owner:
                raise ValueError(f"unknown loss {k!r} (known: {', '.join(LOSSES)})")
            if owner[k] is None:
                what = "model.location_prior is off" if k == "rest" else "its module was not given"
                raise ValueError(f"loss {k!r} has weight {w} but {what}")
        official = [k for k in ("con", "aca") if k in self.weights and owner[k].form == "official"]
        if official and self.tpar is None:
            raise ValueError(f"the official {' and '.join(official)} form needs the shared Tpar")
        if isinstance(self.region, PixelRegionReconstruction) and self.mae_decoder is None:
            raise ValueError("the official region form decodes through the MAE decoder")

    @classmethod
    def from_config(cls, cfg, text_tokenizer, decoder_tokenizer,
                    graph: AnatomyGraph | None = None) -> SSACL:
        graph = graph or graph_from_name(cfg.model.graph)
        m, loss, v, al = cfg.model, cfg.loss, cfg.model.vit, cfg.model.align
        vit = VisionTransformer(cfg.data.image_size, v.patch_size, v.embed_dim, v.depth, v.num_heads,
                                v.mlp_ratio, stem=v.stem)
        if v.init:
            print(f"ViT init from {v.init}: {vit.load_mae_checkpoint(v.init)}")
        text = TextEncoder.from_config(m.text, text_tokenizer)
        on = {k: loss[k].weight > 0 for k in LOSSES}
        official = {k: on[k] and loss[k].form == "official" for k in ("con", "region", "aca")}
        D, modules = v.embed_dim, {}
        if on["mae"] or official["region"]:
            modules["mae_decoder"] = MAEDecoder(
                vit.grid, v.patch_size, 3, D, m.mae.decoder_dim, m.mae.decoder_depth,
                m.mae.decoder_heads, v.mlp_ratio, m.mae.norm_pix_loss, cfg.data.sr_scale)
            # without L_mae only the token path serves (region): the mask token stays out of training
            modules["mae_decoder"].mask_token.requires_grad_(on["mae"])
        if on["con"]:
            modules["contrastive"] = ImageReportContrastive(
                D, text.hidden_size, vit.num_patches, loss.con.form, al.temperature, al.max_logit_scale)
        if on["region"]:
            r = m.region
            modules["region"] = (PixelRegionReconstruction(graph) if official["region"] else RegionDecoder(
                graph, D, r.decoder_dim, r.decoder_depth, r.decoder_heads, v.mlp_ratio))
        if on["aca"]:
            modules["aca"] = AnatomicalConsistency(loss.aca.form, al.aca_identity_weight,
                                                   al.aca_temperature, al.aca_text_temperature)
        if on["entity"]:
            modules["entity_head"] = EntityHead(D, 14, graph.num_leaves, m.entity.hidden_dim,
                                                m.entity.loss, m.entity.threshold)
        if on["lm"]:
            modules["report_decoder"] = build_report_decoder(m.decoder, decoder_tokenizer, D)
        return cls(vit, text, graph, weights={k: loss[k].weight for k in LOSSES},
                   mask_ratio=m.mae.mask_ratio, threshold=m.entity.threshold, modules=modules,
                   temperature=al.temperature if official["con"] or official["aca"] else None,
                   leaf_query_embed=m.leaf_query_embed, spatial_prior=m.spatial_prior,
                   location_prior=m.location_prior.enabled, location_prior_gain=m.location_prior.gain,
                   prefix_grid=m.decoder.prefix_grid,
                   evidence_inputs=tuple(k for k in ("aca", "region") if loss[k].input == "evidence"))

    @classmethod
    def from_checkpoint(cls, path, cfg, device) -> SSACL:
        """The SSACL of a checkpoint, for evaluation / prediction: architecture (model, loss
        weights, image size) and tokenizers from the checkpoint (wherever it lies), weights loaded
        strictly. ``cfg`` is updated in place with those sections (data paths and eval settings
        stay the caller's); a model key newer than the checkpoint takes its default. Images are
        then read at the encoder's size (no super-resolution target is needed to generate)."""
        ckpt = read_checkpoint(path, "--checkpoint", ("model", "config"))
        saved, source = ckpt["config"], f"{path} (its stored config)"
        stored = {"model": with_defaults("model", saved["model"], source),
                  "loss": with_defaults("loss", saved["loss"], source)}
        ignored = differences({k: cfg[k] for k in stored}, stored)
        if ignored:
            print(f"{path}: the checkpoint's model and loss settings are used; ignored: "
                  + ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, mine, theirs in ignored))
        cfg.model, cfg.loss = stored["model"], stored["loss"]
        cfg.data.image_size = saved["data"]["image_size"]
        cfg.data.sr_scale = saved["data"].get("sr_scale", 1)
        cfg.model.vit.init = None  # the checkpoint holds the weights
        model = cls.from_config(cfg, *checkpoint_tokenizers(path, ckpt))
        model.load_state_dict(model.adapt_state_dict(ckpt["model"]))
        cfg.data.sr_scale = 1
        print(f"loaded {Path(path)} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}): "
              f"{count_parameters(model)}")
        return model.to(device)

    def adapt_state_dict(self, state: dict) -> dict:
        """``state`` with its grid-shaped entries (GRID_SHAPED: [..., L]) resized bilinearly to this
        model's patch grid when they come from another resolution (the location prior renormalised)."""
        g = self.vit.grid
        out = dict(state)
        for key in GRID_SHAPED:
            value = out.get(key)
            if value is None or value.shape[-1] == g[0] * g[1]:
                continue
            side = int(round(value.shape[-1] ** 0.5))
            if side * side != value.shape[-1]:
                raise ValueError(f"{key}: {value.shape[-1]} entries are not a square patch grid")
            grid = value.float().reshape(-1, 1, side, side)
            resized = F.interpolate(grid, size=g, mode="bilinear", align_corners=False)
            resized = resized.reshape(*value.shape[:-1], g[0] * g[1]).to(value.dtype)
            if key == "location_prior":  # a distribution over the patches
                resized = resized / resized.sum(-1, keepdim=True).clamp_min(1e-12)
            print(f"{key}: resized from a {side}x{side} to a {g[0]}x{g[1]} patch grid")
            out[key] = resized
        return out

    # ------------------------------------------------------------------ queries and priors
    @property
    def leaf_names(self) -> tuple[str, ...]:
        return self.graph.leaf_names

    def leaf_queries(self) -> torch.Tensor:
        """[K, D]: the text encoder's pooled embedding of each leaf name, projected to the ViT
        width (plus the learned per-leaf embedding when model.leaf_query_embed is on)."""
        _, pooled = self.text_encoder.encode(self.leaf_ids, self.leaf_attn)
        queries = self.query_proj(pooled)
        return queries + self.leaf_query_embed if self.leaf_query_embed is not None else queries

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
        batches = ({**b, "image": self.encoder_images(b["image"])} for b in batches if b is not None)
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
        so Adam moves it at logit pace; the report-derived one adds ``prior_bias`` once estimated."""
        terms = []
        if self.leaf_spatial_prior is not None:
            terms.append(PRIOR_GAIN * self.leaf_spatial_prior)
        if self.location_prior is not None:
            terms.append(prior_bias(self.location_prior, self.location_prior_gain))
        if not terms:
            return None
        bias = sum(terms)
        return self.averaging.to(bias.dtype) @ bias if all_nodes else bias

    def encoder_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the encoder's input: a bicubic resize to the ViT's size when they differ
        (super-resolution data)."""
        size = self.vit.img_size
        if images.shape[-2:] == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                             align_corners=False)

    def lm_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, L, D] patch tokens -> those the LM reads: average-pooled to prefix_grid^2 when set."""
        g = self.prefix_grid
        if not g or g * g >= patches.shape[1]:
            return patches
        h, w = self.vit.grid
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
        return F.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2)

    def _query_outputs(self, encoded: dict, loss: str) -> torch.Tensor:
        """What ``loss`` reads of the queries [B, Q, D]: their output tokens, or (``loss`` in
        evidence_inputs) their evidence: the last-layer attention readout of the patch tokens, centred
        on the image's mean patch (what a query picks out; 0 for attention spread evenly)."""
        if loss not in self.evidence_inputs:
            return encoded["queries"]
        patches = encoded["patches"]
        return encoded["attn"].to(patches.dtype) @ (patches - patches.mean(1, keepdim=True))

    def _finding_leaves(self, batch, batch_size: int, device) -> torch.Tensor:
        """[B, K] bool: the leaves of each report's findings (all False for a normal study)."""
        anatomies = batch.get("anatomies")
        if anatomies is None or anatomies.shape[-1] != self.graph.num_leaves:
            return torch.zeros(batch_size, self.graph.num_leaves, dtype=torch.bool, device=device)
        return anatomies.to(device).bool()

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        inputs = self.encoder_images(images)
        B, enabled = images.shape[0], self.weights.keys()
        if "lm" in enabled:  # the reference labels' prompt, read before any GPU work is queued
            labels = batch.get("labels")
            prompts = (EntityHead.prompt(labels, self.threshold) if labels is not None
                       else [format_prompt([])] * B)
        finding_leaves = self._finding_leaves(batch, B, images.device)
        all_nodes = "region" in enabled
        leaf_queries = self.leaf_queries()
        queries = self.node_queries(leaf_queries) if all_nodes else leaf_queries
        bias = self.query_bias(all_nodes)
        losses: dict[str, torch.Tensor] = {}

        if enabled & UNMASKED_LOSSES:
            with_attn = bool(enabled & (ATTENTION_LOSSES | self.evidence_inputs))
            unmasked = self.vit(inputs, queries, return_attn=with_attn, query_bias=bias)
            leaf_tokens, leaf_attn = unmasked["queries"], unmasked.get("attn")  # [B, K, D], [B, K, L]
            if all_nodes:
                leaf_tokens = leaf_tokens[:, self.leaf_node_index]
                leaf_attn = leaf_attn[:, self.leaf_node_index] if with_attn else None
        if enabled & MASKED_LOSSES:  # masking noise per sample when the engine gives its keys
            keys = batch.get("noise_key")
            noise = sample_noise(keys, self.vit.num_patches) if keys is not None else None
            masked = self.vit(inputs, queries, mask_ratio=self.mask_ratio, query_bias=bias, noise=noise,
                              return_attn="region" in self.evidence_inputs)
        if enabled & REPORT_LOSSES:
            _, report_vectors = self.text_encoder.encode_texts(batch["report"], images.device)

        if "mae" in enabled:
            pred = self.mae_decoder(masked["cls"], masked["patches"], masked["ids_restore"])
            losses["mae"] = self.mae_decoder.loss(images, pred, masked["mask"])
        if "con" in enabled:
            losses["con"] = self.contrastive(masked["patches"], report_vectors, masked["mask"], self.tpar)
        if "region" in enabled:
            masked_nodes = self._query_outputs(masked, "region")
            unmasked_nodes = self._query_outputs(unmasked, "region")
            if isinstance(self.region, PixelRegionReconstruction):
                losses["region"] = self.region(masked_nodes, unmasked_nodes, self.mae_decoder)
            else:
                losses["region"] = self.region(masked_nodes, unmasked_nodes.detach())
        if "aca" in enabled:
            leaf_outputs = self._query_outputs(unmasked, "aca")
            leaf_outputs = leaf_outputs[:, self.leaf_node_index] if all_nodes else leaf_outputs
            losses["aca"] = self.aca(leaf_outputs, report_vectors.detach(), self.tpar)
        if "entity" in enabled:
            obs, anat = self.entity_head(unmasked["cls"], unmasked["patches"], unmasked["local"],
                                         leaf_attn)
            losses["entity"] = self.entity_head.loss(obs, anat, batch["labels"], finding_leaves)
        if "rest" in enabled:
            losses["rest"] = rest_loss(leaf_attn, self.location_prior, finding_leaves)
        if "lm" in enabled:
            shown = EntityHead.leaves_shown(finding_leaves)
            patches = self.lm_patches(unmasked["patches"])
            visual, visual_mask = visual_prefix(leaf_tokens, unmasked["cls"], patches, shown,
                                                cls_visible=self.report_decoder.cls_visible)
            keys = batch.get("noise_key")  # the prompt dropout's draw per sample, as the masking's
            draws = sample_noise(keys, 1, stream=1)[:, 0] if keys is not None else None
            losses["lm"] = self.report_decoder(visual, visual_mask, prompts, batch["report"], draws)
        total = images.new_zeros((), dtype=torch.float32)
        losses["loss"] = sum((w * losses[k].float() for k, w in self.weights.items()), total)
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
        images = self.encoder_images(batch["image"])
        B = images.shape[0]
        out = self.vit(images, self.leaf_queries(), return_attn=self.entity_head is not None,
                       query_bias=self.query_bias())
        if self.entity_head is not None:
            obs_logits, anat_logits = self.entity_head(out["cls"], out["patches"], out["local"],
                                                       out["attn"])
            entities, shown = self.entity_head.predict(obs_logits, anat_logits)
        else:
            entities = [[] for _ in range(B)]
            shown = torch.ones(B, self.graph.num_leaves, dtype=torch.bool, device=images.device)
        visual, visual_mask = visual_prefix(out["queries"], out["cls"], self.lm_patches(out["patches"]), shown,
                                            cls_visible=self.report_decoder.cls_visible)
        prompts = [format_prompt(e) for e in entities]
        reports = self.report_decoder.generate(visual, visual_mask, prompts, **decoding)
        return [{"id": i, "report": r, "entities": e,
                 "anatomies": [n for n, on in zip(self.leaf_names, leaves) if on]}
                for i, r, e, leaves in zip(batch["id"], reports, entities, shown.tolist())]

    @property
    def predicts_entities(self) -> bool:
        """True when the entity head is built (loss.entity > 0): it predicts the test-time prompt."""
        return self.entity_head is not None

    def set_label_prevalence(self, labels: torch.Tensor, anatomies: torch.Tensor, max_weight: float) -> None:
        """The entity head's positive weights from the training targets (models/entity_head.py)."""
        self.entity_head.set_prevalence(labels, anatomies, max_weight)

    def entity_thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The entity head's decision thresholds: observations [14], leaves [K]."""
        return self.entity_head.obs_threshold, self.entity_head.anat_threshold

    def set_entity_thresholds(self, obs: torch.Tensor, anat: torch.Tensor) -> None:
        self.entity_head.set_thresholds(obs, anat)

    @torch.no_grad()
    def entity_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The entity head's probabilities from the images: observations [B, 14], leaves [B, K]."""
        out = self.vit(self.encoder_images(images), self.leaf_queries(), return_attn=True,
                       query_bias=self.query_bias())
        obs, anat = self.entity_head(out["cls"], out["patches"], out["local"], out["attn"])
        return obs.float().sigmoid(), anat.float().sigmoid()

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K, H, W] in [0, 1]: each leaf query's last-layer attention to the patches (heads
        averaged), upsampled to the given images' size and smoothed (models/heatmaps.py)."""
        queries, bias = self.leaf_queries(), self.query_bias()
        attn = self.vit(self.encoder_images(images), queries, return_attn=True, query_bias=bias)["attn"]
        return leaf_heatmaps(attn.float(), self.vit.grid, tuple(images.shape[-2:]))

    def lr_scales(self, lm_scale: float) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier (the LM's model.decoder.lr_scale)."""
        return {"report_decoder.lm.": lm_scale}
