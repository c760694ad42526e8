"""Launched by tests/test_train.py with ``python -m`` (one process) or ``torchrun`` (two): one
epoch of the real SS-ACL through engine.train, then optionally generation over a split.

Made deterministic across process counts: no augmentation (eval transform on train), dropout off,
and MAE masking noise and the LM's prompt dropout drawn per sample from its dataset index (the
model draws them from the global RNG). Plain SGD without clipping, so that the parameters are a
linear function of the gradients.
"""
import argparse
from pathlib import Path

import torch
from torch import nn

import models.vit as vit
from datasets.cxr import build_dataset
from datasets.loaders import eval_loader, train_loader
from datasets.tokenizer import load_tokenizer
from engine.evaluate import generate_and_score
from engine.optim import wrap_ddp
from engine.setup import ensure_location_prior
from engine.train import train_one_epoch
from models.report_decoder import ReportDecoder
from models.ssacl import SSACL
from utils.config import load_config
from utils.dist import cleanup, init_distributed
from utils.lr_sched import param_groups


def per_sample_masking():
    """Masking noise and the LM's prompt-dropout draws of each sample from generators seeded by its
    dataset index."""
    current = {}
    forward, masking, keep = SSACL.forward, vit.random_masking, ReportDecoder.keep_prompts

    def ssacl_forward(self, batch):
        current["index"] = batch["index"].tolist()
        return forward(self, batch)

    def random_masking(batch, length, mask_ratio, device, noise=None):
        if noise is None and current.get("index") and len(current["index"]) == batch:
            noise = torch.stack(
                [
                    torch.rand(length, generator=torch.Generator().manual_seed(1000 + i))
                    for i in current["index"]
                ]
            ).to(device)
        return masking(batch, length, mask_ratio, device, noise)

    def keep_prompts(self, n):  # the LM's prompt dropout, drawn per sample from its index too
        if self.prompt_dropout <= 0 or len(current.get("index") or ()) != n:
            return keep(self, n)
        return [bool(torch.rand(1, generator=torch.Generator().manual_seed(2000 + i))
                     >= self.prompt_dropout) for i in current["index"]]

    SSACL.forward, vit.random_masking = ssacl_forward, random_masking
    ReportDecoder.keep_prompts = keep_prompts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--eval-split", default=None)
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    info = init_distributed(cfg.dist.backend, cfg.device)
    per_sample_masking()

    train_set = build_dataset(cfg, "train", train=False)
    text_tok, dec_tok = (
        load_tokenizer(cfg.model.text.tokenizer),
        load_tokenizer(cfg.model.decoder.tokenizer),
    )
    torch.manual_seed(0)
    model = SSACL.from_config(cfg, text_tok, dec_tok)
    ensure_location_prior(model, cfg, info)  # the demo config's: estimated over the ranks' shards
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # SGD: the update is linear in the gradient, so a gradient-scale error shows in the parameters
    # (AdamW and clipping are scale-invariant and would hide it).
    optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model_ddp = wrap_ddp(model, cfg, info)
    stats = train_one_epoch(
        model_ddp, train_loader(train_set, cfg, info), optimizer, scaler, 0, cfg, info.device
    )
    if info.rank == 0:
        torch.save({"init": init, "params": model.state_dict(), "stats": stats}, args.out)
    if args.eval_split:
        dataset = build_dataset(cfg, args.eval_split, train=False)
        metrics = generate_and_score(
            model_ddp,
            eval_loader(dataset, cfg, info),
            info.device,
            cfg,
            Path(args.out).parent / f"eval_{info.world_size}",
            prefix=args.eval_split,
        )
        print(f"rank {info.rank} metrics {metrics}", force=True)
    cleanup()


if __name__ == "__main__":
    main()
