"""Downstream fine-tuning: classification (NIH ChestX-ray14, RSNA pneumonia) and segmentation (SIIM
pneumothorax), by full fine-tuning or a linear probe, from an SS-ACL checkpoint, an MAE ViT
state_dict, or random init (the baseline).

    python main_finetune.py --config configs/finetune_demo_cls.yaml --set train.pretrained=CKPT
    python main_finetune.py --config configs/finetune_demo_cls.yaml --set finetune.mode=linear_probe
    torchrun --nproc_per_node=8 main_finetune.py --config configs/finetune_nih.yaml --resume auto
    python main_finetune.py --config configs/finetune_nih.yaml --eval --checkpoint CKPT

The encoder comes from train.pretrained (an SS-ACL checkpoint or an MAE state_dict, told apart by
their keys; --init sets model.vit.init for an MAE one); neither set = random init. The label
fraction is finetune.split_file (the official train_1.txt ...) or finetune.fraction. Model selection
is on the VAL split (train.best_metric: val/auroc or val/dice); ``--eval`` scores eval.split (test)
once, with the classification thresholds chosen on val, into eval_<split>/metrics.json. Outputs
under output_dir/run_name/ as main_pretrain.py's.
"""

from __future__ import annotations

import json

from engine import finetune as ft
from engine import setup
from engine.train import train_epochs
from models.downstream import from_finetuned
from utils.dist import cleanup, is_main_process


def get_args_parser():
    p = setup.parser("SS-ACL downstream fine-tuning (classification, segmentation), --eval")
    p.add_argument("--eval", action="store_true",
                   help="score eval.split (default test) with --checkpoint, thresholds from val")
    p.add_argument("--checkpoint", default=None, help="main_finetune.py checkpoint for --eval")
    return p


def _show(prefix: str, metrics: dict) -> str:
    keys = [k for k in metrics if "/" not in k]
    return f"[{prefix}] " + "  ".join(f"{k}: {metrics[k]:.4f}" if isinstance(metrics[k], float)
                                      else f"{k}: {metrics[k]}" for k in keys)


def train(cfg):
    info, run_dir, tb = setup.setup_run(cfg)
    run, seg = ft.prepare_finetune(cfg, info, run_dir)
    names = () if seg else run.val_loader.dataset.dataset.label_names

    def validate(epoch, step):
        val = ft.evaluate(run.model, run.val_loader, info.device, cfg, seg, names)
        print(_show(f"val epoch {epoch}", val))
        metrics = {f"val/{k}": v for k, v in val.items()}
        tb.add_scalars(metrics, step)
        return metrics

    train_epochs(run, cfg, info.device, tb, run_dir, validate)
    print(f"evaluate on {cfg.eval.split}: python main_finetune.py --config <this config> --eval "
          f"--checkpoint {run_dir / 'checkpoint-best.pth'}")
    tb.close()


def evaluate(cfg, checkpoint) -> dict:
    """Thresholds (classification) chosen on val, then eval.split scored once."""
    info, run_dir, tb = setup.setup_run(cfg)
    model = from_finetuned(checkpoint, cfg).to(info.device)
    split = cfg.eval.split
    val_set, test_set = ft.build_split(cfg, "val"), ft.build_split(cfg, split)
    seg = ft.is_segmentation(test_set)
    names = () if seg else test_set.label_names
    thresholds, val = None, None
    if not seg:
        val = ft.evaluate(model, ft.eval_loader(val_set, cfg, info), info.device, cfg, seg, names)
        thresholds = ft.thresholds_of(val, names)
    metrics = ft.evaluate(model, ft.eval_loader(test_set, cfg, info), info.device, cfg, seg, names,
                          thresholds)
    print(_show(split, metrics))
    tb.add_scalars({f"{split}/{k}": v for k, v in metrics.items()}, 0)
    out_dir = run_dir / f"eval_{split}"
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": str(checkpoint), "task": cfg.finetune.task, "split": split,
                  "metrics": metrics, "thresholds_from": None if seg else "val", "val": val}
        (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir / 'metrics.json'}")
    tb.close()
    return metrics


def main(args):
    cfg = setup.load_run_config(args)
    if args.eval:
        if not args.checkpoint:
            raise SystemExit("--eval needs --checkpoint")
        evaluate(cfg, args.checkpoint)
    else:
        train(cfg)
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
