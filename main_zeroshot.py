"""Zero-shot evaluation of SS-ACL: classification from text prompts, image-text retrieval, phrase
grounding (cfg.zeroshot; engine/zeroshot.py).

    python main_zeroshot.py --config configs/zeroshot_demo.yaml --checkpoint output/demo/checkpoint-best.pth
    python main_zeroshot.py --config configs/zeroshot_demo.yaml --checkpoint CKPT --random-init   # baseline
    torchrun --nproc_per_node=8 main_zeroshot.py --config configs/zeroshot_mimic.yaml --tasks grounding

The model: ``--checkpoint``, else train.pretrained (any SS-ACL pretraining or report checkpoint);
``--random-init`` (or neither set) scores an untrained model, of the checkpoint's architecture and
tokenizers when one is named. Writes output_dir/run_name/zeroshot_<split>[_random_init]/metrics.json
and TensorBoard scalars; single process or torchrun (rows gathered over the ranks, figures on rank 0).
"""

from __future__ import annotations

import json

from engine import setup
from engine.zeroshot import build_model, run_zeroshot
from utils.dist import cleanup, is_main_process

KINDS = ("classification", "retrieval", "grounding")
PER_LABEL = ("auroc", "f1", "threshold", "by_label")  # in metrics.json, not printed


def get_args_parser():
    p = setup.parser("SS-ACL zero-shot classification, retrieval and phrase grounding")
    p.add_argument("--checkpoint", default=None, help="SS-ACL checkpoint (default: train.pretrained)")
    p.add_argument("--random-init", action="store_true",
                   help="score an untrained model (the baseline), of --checkpoint's architecture if given")
    p.add_argument("--tasks", nargs="+", choices=KINDS, default=None,
                   help="run only these kinds (default: every data set cfg.zeroshot names)")
    return p


def main(args):
    cfg = setup.load_run_config(args)
    for kind in KINDS:
        if args.tasks is not None and kind not in args.tasks:
            cfg.zeroshot[kind] = []
    info, run_dir, tb = setup.setup_run(cfg)
    checkpoint = args.checkpoint or cfg.train.pretrained or None
    model, source = build_model(cfg, checkpoint, args.random_init or not checkpoint, info.device)
    results = run_zeroshot(model, cfg, info, source)
    suffix = "_random_init" if args.random_init or not checkpoint else ""
    out_dir = run_dir / f"zeroshot_{cfg.zeroshot.split}{suffix}"
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({"model": source, **results}, indent=2))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()
                          if not any(f"/{p}/" in k for p in PER_LABEL) and "/iou@" not in k},
                         indent=1))
    tb.add_scalars(results, step=0, prefix=f"zeroshot_{cfg.zeroshot.split}{suffix}")
    tb.close()
    print(f"wrote {out_dir / 'metrics.json'}")
    cleanup()
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
