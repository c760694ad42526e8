"""Report generation with SS-ACL: fine-tune from a pretraining checkpoint, evaluate, predict.

    python main_report.py --config configs/demo_report.yaml                  # fine-tune from train.pretrained
    python main_report.py --config configs/demo_report.yaml --eval --checkpoint output/demo_report/checkpoint-best.pth
    python main_report.py --config configs/demo_report.yaml --predict a.png b.png --checkpoint CKPT

Fine-tuning picks checkpoint-best.pth by a generation metric on the VAL split (train.best_metric,
e.g. val/BLEU_4); ``--eval`` scores eval.split (default test) once, from ``--checkpoint``. Single
process (``python``, CPU fine) or ``torchrun``. Outputs under output_dir/run_name/ (see
main_pretrain.py), plus val/epoch_NNNN/, eval_<split>/ (generated.jsonl, metrics.json, overlays/)
and predict/.
"""

from __future__ import annotations

import json

from datasets.cxr import build_dataset
from datasets.loaders import eval_loader
from engine import setup
from engine.calibrate import calibrate_entity_thresholds
from engine.evaluate import evaluate_grounding, generate_and_score
from engine.predict import predict_images_from_config
from engine.train import train_epochs
from models.ssacl import SSACL
from utils.dist import cleanup, is_main_process


def get_args_parser():
    p = setup.parser("SS-ACL report generation: fine-tune, --eval, --predict")
    p.add_argument("--eval", action="store_true", help="score eval.split (default test) with --checkpoint")
    p.add_argument("--checkpoint", default=None, help="SS-ACL checkpoint for --eval / --predict")
    p.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                   help="write report, entities and heatmaps for these images (no annotation needed)")
    p.add_argument("--visualize", action="store_true",
                   help="with --eval: heatmap overlays for every study (default: the first eval.num_visualize)")
    p.add_argument("--grounding-only", action="store_true",
                   help="with --eval: only the heatmaps' grounding figures on the synthetic masks (no generation)")
    return p


def finetune(cfg):
    info, run_dir, tb = setup.setup_run(cfg)
    run = setup.prepare_training(cfg, info, run_dir)

    def validate(epoch, step):
        if cfg.model.entity.calibrate:
            calibrate_entity_thresholds(run.model, run.val_loader, info.device, cfg.train.amp)
        out_dir = run_dir / "val" / f"epoch_{epoch:04d}"
        val = generate_and_score(run.model, run.val_loader, info.device, cfg, out_dir, tb=tb, epoch=epoch,
                                 prefix="val", step=step)
        return {f"val/{k}": v for k, v in val.items()}

    train_epochs(run, cfg, info.device, tb, run_dir, validate)
    print(f"evaluate on {cfg.eval.split}: python main_report.py --config <this config> --eval "
          f"--checkpoint {run_dir / 'checkpoint-best.pth'}")
    tb.close()


def evaluate(cfg, checkpoint, visualize_all: bool, grounding_only: bool):
    info, run_dir, tb = setup.setup_run(cfg)
    model = SSACL.from_checkpoint(checkpoint, cfg, info.device)
    split, out_dir = cfg.eval.split, run_dir / f"eval_{cfg.eval.split}"
    dataset = build_dataset(cfg, split, train=False)
    print(f"{split}: {len(dataset)} samples")
    loader = eval_loader(dataset, cfg, info)
    if grounding_only:
        metrics = evaluate_grounding(model, loader, info.device, cfg, split)
        if is_main_process():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "grounding.json").write_text(json.dumps(metrics, indent=2))
            print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
        print(f"wrote {out_dir / 'grounding.json'}")
    else:
        num_visualize = len(dataset) if visualize_all else None
        metrics = generate_and_score(model, loader, info.device, cfg, out_dir, tb=tb, prefix=split,
                                     num_visualize=num_visualize)
        print(f"wrote {out_dir}/generated.jsonl and metrics.json")
    tb.close()
    return metrics


def predict(cfg, checkpoint, images):
    info, run_dir, _ = setup.setup_run(cfg, log=False)
    model = SSACL.from_checkpoint(checkpoint, cfg, info.device)
    if is_main_process():
        rows = predict_images_from_config(model, images, cfg, run_dir / "predict", info.device)
        for r in rows:
            print(json.dumps({k: r[k] for k in ("id", "image_path", "report", "entities", "anatomies")}))
        print(f"wrote {run_dir / 'predict'}")


def main(args):
    cfg = setup.load_run_config(args)
    if (args.eval or args.predict) and not args.checkpoint:
        raise SystemExit("--eval and --predict need --checkpoint")
    if args.predict:
        predict(cfg, args.checkpoint, args.predict)
    elif args.eval:
        evaluate(cfg, args.checkpoint, args.visualize, args.grounding_only)
    else:
        finetune(cfg)
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
