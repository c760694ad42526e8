"""Launched by tests/test_optim.py with ``python -m`` (one process, plain) or ``torchrun`` (two CPU
ranks over gloo, ``train.fsdp=true``): the real training path - engine.setup.prepare_training
(model, FSDP or not, AdamW, Checkpointer and its resume) - then epochs up to ``--until`` through
engine.train, each ending with the Checkpointer's save. Writes to ``--out`` (rank 0) the full
parameters, the epoch stats and the checkpoint written after each epoch.

With ``--generate`` it then generates under FSDP (``full_parameters``) from a different number of
studies on each rank, so that the ranks decode for different numbers of steps, and rank 0 compares
its reports with those of a plain SSACL holding the gathered weights; then generate_and_score over
the test split. Deterministic across process counts as tests/helpers/ddp_worker.py (per-sample
masking noise and prompt dropout, dropout off).
"""

import argparse

import torch
from torch import nn

from datasets.cxr import build_dataset, collate
from datasets.loaders import eval_loader, to_device
from engine import setup
from engine.evaluate import generate_and_score
from engine.optim import full_parameters
from engine.train import train_one_epoch
from models.report_decoder import decoding_options
from models.ssacl import SSACL
from utils.checkpoint import is_fsdp, unwrap
from utils.config import load_config
from utils.dist import cleanup, get_rank, get_world_size, is_main_process


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--until", type=int, required=True)
    p.add_argument("--generate", action="store_true")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    info, run_dir, _ = setup.setup_run(cfg, log=False)
    run = setup.prepare_training(cfg, info, run_dir)
    model = unwrap(run.model)
    assert is_fsdp(run.model) == (info.world_size > 1)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    # Adam scales a gradient's rounding noise to an lr-sized step where the exact gradient is 0 (the
    # attention key biases): a large eps keeps 1 and 2 processes comparable
    for group in run.optimizer.param_groups:
        group["eps"] = 1e-3
    record = {"start_epoch": run.start_epoch, "epochs": {}}
    for epoch in range(run.start_epoch, args.until):
        stats = train_one_epoch(run.model, run.train_loader, run.optimizer, run.scaler, epoch, cfg,
                                info.device, on_step=run.checkpointer.on_step)
        run.checkpointer.end_epoch(epoch, stats["global_step"])
        if is_main_process():
            ckpt = torch.load(run_dir / "checkpoint-last.pth", map_location="cpu",
                              weights_only=True)
            record["epochs"][epoch] = {"stats": stats, "params": ckpt["model"],
                                       "optimizer": ckpt["optimizer"]}
    if args.generate:
        record["generated"] = generate(run.model, cfg, info, run_dir)
        val = build_dataset(cfg, "test", train=False)
        metrics = generate_and_score(run.model, eval_loader(val, cfg, info), info.device,
                                     cfg, run_dir / "eval_test", prefix="test")
        record["num_studies"] = metrics["num_studies"]
    if is_main_process():
        torch.save(record, args.out)
    cleanup()


def generate(model, cfg, info, run_dir):
    """Rank r generates for r + 1 test studies, up to 12 // (r + 1) tokens, under FSDP; rank 0 also
    with a plain SSACL loaded from the checkpoint."""
    dataset = build_dataset(cfg, "test", train=False)
    batch = to_device(collate([dataset[i] for i in range(get_rank() + 1)]), info.device)
    kw = {**decoding_options(cfg.eval), "min_new_tokens": 0, "max_new_tokens": 12 // (get_rank() + 1)}
    with full_parameters(model), torch.no_grad():
        rows = unwrap(model).eval().generate(batch, **kw)
    out = {"rows": rows, "world_size": get_world_size()}
    if is_main_process():
        plain = SSACL.from_checkpoint(run_dir / "checkpoint-last.pth", cfg, info.device).eval()
        out["plain"] = plain.generate(batch, **kw)
    return out


if __name__ == "__main__":
    main()
