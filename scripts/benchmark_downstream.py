"""Speed of the downstream suite: zero-shot evaluation of N images (CheXpert 5x200 size: 1,000) and
fine-tuning throughput (classification: full and linear probe; segmentation).

    python scripts/benchmark_downstream.py                               # tiny + base, this device
    python scripts/benchmark_downstream.py --device cuda --presets base --zs-images 1000 --batch-size 32

- zero-shot: ``models.embeddings`` image embeddings of N synthetic chest X-rays and text embeddings
  of their N captions (batches of --zs-batch-size), the N x N similarity and retrieval P@K / R@K
  (metrics/retrieval.py), timed end to end: images/s and the seconds 1,000 images take.
- fine-tuning: ``engine.train.train_one_epoch`` (the step main_finetune.py runs) on the
  ``models.downstream`` classifier (14 labels) and segmenter around the preset's ViT: samples/s,
  GFLOP per sample, memory (scripts/benchmark.py's bench_train).

Random weights (speed does not depend on them); AMP as train.amp resolves on the device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datasets.cxr import binarize_labels  # noqa: E402
from engine.optim import autocast, resolve_amp  # noqa: E402
from metrics.retrieval import retrieval_metrics  # noqa: E402
from models.downstream import build_model as build_downstream_model  # noqa: E402
from models.embeddings import image_embeddings, text_embeddings  # noqa: E402
from scripts.benchmark import (  # noqa: E402
    _sync,
    bench_train,
    build_config,
    build_model,
    device_name,
    make_batch,
    synthetic_studies,
    write_report,
)
from utils.dist import device_for  # noqa: E402
from vocab.anatomy_graph import graph_from_name  # noqa: E402
from vocab.report_text import clean_report  # noqa: E402


@torch.no_grad()
def bench_zeroshot(model, cfg, studies: list[dict], device, batch_size: int) -> dict:
    """Embeds every image and caption, then scores retrieval; the whole of it timed."""
    graph = graph_from_name(cfg.model.graph)
    batches = [make_batch(cfg, studies[i:i + batch_size], graph, device)
               for i in range(0, len(studies), batch_size)]
    captions = [clean_report(s["report"]).split(".")[0] for s in studies]
    classes = [int(binarize_labels(s["labels"]).argmax()) for s in studies]  # for P@K only
    dtype = resolve_amp(cfg.train.amp, device)
    model.eval()

    def run():
        with autocast(device, dtype):
            z = torch.cat([image_embeddings(model, b["image"]).float() for b in batches])
            t = torch.cat([text_embeddings(model, captions[i:i + batch_size]).float()
                           for i in range(0, len(captions), batch_size)])
        return retrieval_metrics((z @ t.T).cpu().numpy(), classes, classes)

    with torch.no_grad():  # warm-up on one batch (kernels, allocator)
        image_embeddings(model, batches[0]["image"])
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images": len(studies), "batch_size": batch_size, "seconds": dt,
            "images_per_s": len(studies) / dt, "seconds_per_1000_images": 1000 * dt / len(studies)}


def finetune_batch(cfg, studies: list[dict], device, segmentation: bool) -> dict:
    """A downstream batch: images, 14 labels, and a mask (the first finding's region or none)."""
    graph = graph_from_name(cfg.model.graph)
    batch = make_batch(cfg, studies, graph, device)
    out = {k: batch[k] for k in ("image", "labels", "index", "id")}
    if segmentation:
        S = batch["image"].shape[-1]
        out["mask"] = (torch.rand(len(studies), 1, S, S, device=device) > 0.9).float()
    return out


def run_preset(preset: str, args, device) -> dict:
    cfg = build_config(preset, device=args.device, amp=args.amp, sets=args.set)
    cfg.data.sr_scale = 1  # downstream images come at the encoder's size (no MAE target)
    on_cpu_base = device.type == "cpu" and preset == "base"
    n = args.zs_images or (64 if on_cpu_base else 1000)
    studies = synthetic_studies(n, cfg.data.image_size, seed=0)
    model = build_model(cfg, device, [s["report"] for s in studies])
    res = {"preset": preset, "image_size": cfg.data.image_size,
           "zeroshot": bench_zeroshot(model, cfg, studies, device, args.zs_batch_size)}
    del model
    B = args.batch_size or (2 if on_cpu_base else cfg.data.batch_size)
    iters, warmup = (2, 1) if on_cpu_base else (args.iters, 2)
    for name, mode, seg in (("classification_full", "full", False),
                            ("classification_linear_probe", "linear_probe", False),
                            ("segmentation_full", "full", True)):
        cfg.finetune.mode = mode
        net = build_downstream_model(cfg, 14, seg).to(device)
        batch = finetune_batch(cfg, studies[:B], device, seg)
        res[name] = bench_train(net, cfg, batch, device, iters, warmup)
        print(f"  {preset} {name}: {res[name]['samples_per_s']:.1f} samples/s, "
              f"{res[name]['flops_per_sample'] / 1e9:.2f} GFLOP/sample", flush=True)
    z = res["zeroshot"]
    print(f"  {preset} zero-shot: {z['images']} images in {z['seconds']:.1f} s = "
          f"{z['images_per_s']:.1f} images/s ({z['seconds_per_1000_images']:.0f} s per 1,000)")
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--presets", default="tiny,base", help="tiny (configs/demo.yaml) | base | a config")
    p.add_argument("--zs-images", type=int, default=None, help="default 1000 (CPU base: 64)")
    p.add_argument("--zs-batch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (CPU base: 2)")
    p.add_argument("--iters", type=int, default=10, help="timed fine-tuning steps")
    p.add_argument("--amp", default=None, help="override train.amp")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    p.add_argument("--out", default="output/benchmark_downstream.json")
    args = p.parse_args(argv)
    device = device_for(args.device)
    results = []
    for preset in [s for s in args.presets.split(",") if s]:
        print(f"[benchmark_downstream] {preset} on {device_name(device)}", flush=True)
        results.append(run_preset(preset, args, device))
    return write_report(args.out, device=device_name(device), threads=torch.get_num_threads(),
                        results=results)


if __name__ == "__main__":
    main()
