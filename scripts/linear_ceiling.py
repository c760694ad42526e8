"""How linearly readable are a pretrained encoder's findings? A logistic regression per label, fitted
to every training image of a downstream classification set on frozen SS-ACL features, scored on val:
the ceiling a linear probe can reach.

    python scripts/linear_ceiling.py --checkpoint output/demo/checkpoint-best.pth \
        --config configs/demo.yaml --root data/synthetic_downstream/nih [--random-init]

Features: the mean patch token, CLS, and the leaf query tokens (concatenated). Prints the val AUROC per
label and the macro over labels with both classes, per feature; writes --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datasets.downstream import build_downstream, collate_downstream  # noqa: E402
from engine.zeroshot import build_model  # noqa: E402
from utils.config import load_config  # noqa: E402


@torch.no_grad()
def features(model, task: str, root: str, split: str, size: int) -> tuple[dict, np.ndarray, list]:
    """({feature name: [N, D]}, labels [N, C], label names) of one split."""
    dataset = build_downstream(task, root, split, size)
    feats, labels = {"mean_patch": [], "cls": [], "leaves": []}, []
    for batch in DataLoader(dataset, batch_size=100, collate_fn=collate_downstream):
        images = model.encoder_images(batch["image"].expand(-1, 3, -1, -1))
        out = model.vit(images, model.leaf_queries())
        feats["mean_patch"].append(out["patches"].mean(1))
        feats["cls"].append(out["cls"])
        feats["leaves"].append(out["queries"].flatten(1))
        labels.append(batch["labels"])
    return ({k: torch.cat(v).float().numpy() for k, v in feats.items()},
            torch.cat(labels).numpy(), list(dataset.label_names))


def ceiling(train: tuple, val: tuple) -> dict:
    """{feature: {"macro": AUROC, "per_label": {name: AUROC}}} over labels present in both splits."""
    (x_tr, y_tr, names), (x_va, y_va, _) = train, val
    out = {}
    for name in x_tr:
        per = {}
        for c, label in enumerate(names):
            if y_tr[:, c].min() == y_tr[:, c].max() or y_va[:, c].min() == y_va[:, c].max():
                continue
            clf = LogisticRegression(max_iter=2000).fit(x_tr[name], y_tr[:, c])
            per[label] = float(roc_auc_score(y_va[:, c], clf.decision_function(x_va[name])))
        out[name] = {"macro": float(np.mean(list(per.values()))), "per_label": per}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="SS-ACL checkpoint")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--task", default="nih", choices=("nih", "rsna"))
    p.add_argument("--root", default="data/synthetic_downstream/nih")
    p.add_argument("--random-init", action="store_true",
                   help="the checkpoint's architecture with fresh weights (the baseline)")
    p.add_argument("--out", default="output/linear_ceiling.json")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [])
    model, _ = build_model(cfg, args.checkpoint, args.random_init, torch.device("cpu"))
    size = model.vit.img_size
    result = ceiling(*(features(model, args.task, args.root, s, size) for s in ("train", "val")))
    for name, r in result.items():
        labels = ", ".join(f"{k} {v:.3f}" for k, v in r["per_label"].items())
        print(f"{name:11} val AUROC {r['macro']:.3f}  ({labels})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
