"""Why do (or don't) the leaf queries ground? Measurements of a checkpoint's anatomy queries on a split.

    python scripts/grounding_diagnostics.py --config configs/demo.yaml --checkpoint CKPT [--split val]

Per leaf, over the split's images (the unmasked pass, last layer, heads averaged):
- attention entropy / log L (1 = uniform over the patches);
- peak spread: the standard deviation, in patches, of the attention peak's position over images
  (0 = the leaf looks at the same place in every image);
- image share: the share of the leaf tokens' variance that lies between images (0 = the token is the
  same in every image: it carries its query, not the image);
- left/right overlap: for each pair of lateral leaves, the summed minimum of their attention maps
  (1 = the two sides look at the same patches).
And for the losses: Tpar; ACA's loss on the real leaf tokens against its loss on image-independent
tokens (each leaf's mean token over the split: the trivial solution); the region targets' share of
variance between images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.cxr import build_dataset  # noqa: E402
from datasets.loaders import eval_loader  # noqa: E402
from engine.setup import load_run_config, parser, setup_run  # noqa: E402
from models.ssacl import SSACL  # noqa: E402


def between_image_share(x: torch.Tensor) -> torch.Tensor:
    """x [N, K, D] -> [K]: variance across images / total variance around zero-mean features."""
    between = x.var(0).sum(-1)
    return between / (between + x.mean(0).pow(2).sum(-1)).clamp_min(1e-12)


@torch.no_grad()
def diagnose(model: SSACL, loader, device) -> dict:
    model.eval()
    tokens, attn, nodes = [], [], []
    for batch in loader:
        if batch is None:
            continue
        images = model.encoder_images(batch["image"].to(device))
        out = model.vit(images, model.node_queries(model.leaf_queries()), return_attn=True,
                        query_bias=model.query_bias(True))
        nodes.append(out["queries"].float().cpu())
        tokens.append(out["queries"][:, model.leaf_node_index].float().cpu())
        attn.append(out["attn"][:, model.leaf_node_index].float().cpu())
    tokens, attn, nodes = torch.cat(tokens), torch.cat(attn), torch.cat(nodes)
    N, K, L = attn.shape
    g = int(L**0.5)
    entropy = -(attn.clamp_min(1e-12).log() * attn).sum(-1).mean(0) / torch.log(torch.tensor(float(L)))
    peak = attn.argmax(-1)
    rows, cols = (peak // g).float(), (peak % g).float()
    spread = (rows.var(0) + cols.var(0)).sqrt()
    names = list(model.leaf_names)
    lateral = [(n, "left" + n[5:]) for n in names if n.startswith("right ") and "left" + n[5:] in names]
    overlap = {n[6:]: float(torch.minimum(attn[:, names.index(a)], attn[:, names.index(b)]).sum(-1).mean())
               for a, b in lateral for n in [a]}
    out = {"leaves": {n: {"entropy": float(entropy[k]), "peak_spread_patches": float(spread[k]),
                          "image_share": float(between_image_share(tokens)[k])}
                      for k, n in enumerate(names)},
           "left_right_overlap": overlap,
           "mean_entropy": float(entropy.mean()), "mean_peak_spread": float(spread.mean()),
           "mean_image_share": float(between_image_share(tokens).mean()),
           "mean_left_right_overlap": sum(overlap.values()) / max(len(overlap), 1)}
    if model.tpar is not None:
        out["tpar"] = float(model.tpar)
    if model.aca is not None and model.tpar is not None:
        text = torch.zeros(N, 1)  # the text target's share is 0.1; its image pairs are held equal here
        trivial = tokens.mean(0, keepdim=True).expand(N, -1, -1)
        out["aca_loss_real"] = float(model.aca(tokens, text + 1, model.tpar.cpu()))
        out["aca_loss_image_independent"] = float(model.aca(trivial, text + 1, model.tpar.cpu()))
    if model.region is not None and model.mae_decoder is not None:
        parents = nodes[:, model.region.inner_index.cpu()]
        decoded = model.mae_decoder.cpu().decode_tokens(parents.reshape(-1, 1, parents.shape[-1]))[:, 0]
        out["region_target_image_share"] = float(between_image_share(decoded.view(N, -1, decoded.shape[-1])).mean())
    return out


def main(argv=None) -> dict:
    p = parser("Grounding diagnostics of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    cfg = load_run_config(args)
    info, _, _ = setup_run(cfg, log=False)
    model = SSACL.from_checkpoint(args.checkpoint, cfg, info.device)
    loader = eval_loader(build_dataset(cfg, args.split, train=False), cfg, info)
    result = diagnose(model, loader, info.device)
    summary = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
