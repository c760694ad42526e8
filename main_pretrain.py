"""SS-ACL pretraining: every loss of the method on image-report pairs (MAE's main_pretrain shape).

    python main_pretrain.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 main_pretrain.py --config configs/pretrain_mimic.yaml --resume auto

Everything is configured in YAML (configs/defaults.yaml names every key); ``--set key=value``
overrides. Writes output_dir/run_name/: config.yaml, log.txt, log_stats.jsonl, tensorboard/,
tokenizers/, checkpoint-last.pth (resume), checkpoint-NNNN.pth, checkpoint-best.pth (by
train.best_metric on VAL).
"""

from __future__ import annotations

from engine import setup
from engine.calibrate import calibrate_entity_thresholds
from engine.evaluate import evaluate_loss
from engine.train import train_epochs
from utils.dist import cleanup


def main(args):
    cfg = setup.load_run_config(args)
    info, run_dir, tb = setup.setup_run(cfg)
    run = setup.prepare_training(cfg, info, run_dir)

    def validate(epoch, step):
        losses = evaluate_loss(run.model, run.val_loader, info.device, cfg.train.amp, cfg.seed)
        metrics = {f"val/{k}": v for k, v in losses.items()}
        if cfg.model.entity.calibrate:
            thresholds = calibrate_entity_thresholds(run.model, run.val_loader, info.device, cfg.train.amp)
            metrics.update({f"val/{k}": v for k, v in thresholds.items()})
        tb.add_scalars(metrics, step)
        print(f"[val] epoch {epoch}: " + "  ".join(
            f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
        return metrics

    train_epochs(run, cfg, info.device, tb, run_dir, validate)
    tb.close()
    cleanup()


if __name__ == "__main__":
    main(setup.parser("SS-ACL pretraining").parse_args())
