"""SS-ACL pretraining: every loss of the method on image-report pairs (MAE's main_pretrain shape).

    python main_pretrain.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 main_pretrain.py --config configs/pretrain_mimic.yaml --resume auto

Everything is configured in YAML (configs/defaults.yaml names every key); ``--set key=value`` overrides.
Writes output_dir/run_name/: config.yaml, log.txt, log_stats.jsonl, tensorboard/, tokenizers/,
checkpoint-last.pth (resume), checkpoint-NNNN.pth, checkpoint-best.pth (by train.best_metric on VAL).
"""
from __future__ import annotations

from datasets.cxr import build_dataset
from engine.evaluate import evaluate_loss
from engine.train import train_epochs
from models.ssacl import SSACL
from utils import run
from utils.config import save_config
from utils.dist import cleanup, is_main_process


def get_args_parser():
    return run.parser("SS-ACL pretraining")


def main(args):
    cfg = run.load_run_config(args)
    info, run_dir, tb = run.setup(cfg)
    device = info.device

    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False)
    print(f"train: {len(train_set)} samples  val: {len(val_set)} samples")
    text_tok, dec_tok, tok_dirs = run.tokenizers(cfg, [s.report for s in train_set.samples], run_dir)
    if is_main_process():
        save_config(cfg, run_dir / "config.yaml")

    model = SSACL.from_config(cfg, text_tok, dec_tok).to(device)  # loads train.init (MAE ViT) if set
    print(f"model: {run.count_parameters(model)}; losses {model.weights}")
    optimizer, scaler = run.build_optimizer(cfg, model, info)
    ckpt = run.Checkpointer(run_dir, cfg, model, optimizer, scaler, extra={"tokenizers": tok_dirs})
    start_epoch, start_step = ckpt.resume(cfg.train.resume)
    run.ensure_location_prior(model, cfg, info)
    model_ddp = run.wrap_ddp(model, cfg, info)
    train_loader, val_loader = run.train_loader(train_set, cfg, info), run.eval_loader(val_set, cfg, info)

    def validate(epoch, step):
        metrics = {f"val/{k}": v for k, v in evaluate_loss(model_ddp, val_loader, device, cfg.train.amp).items()}
        tb.add_scalars(metrics, step)
        print(f"[val] epoch {epoch}: " + "  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        return metrics

    train_epochs(model_ddp, train_loader, optimizer, scaler, cfg, device, ckpt=ckpt, tb=tb, run_dir=run_dir,
                 start_epoch=start_epoch, start_step=start_step, validate=validate)
    tb.close()
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
