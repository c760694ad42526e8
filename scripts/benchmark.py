"""Speed of SS-ACL: the real pretraining step and beam-3 report generation (nanoGPT's bench.py
idea).

    python scripts/benchmark.py                        # tiny (demo) + base (ViT-B/16 + GPT-2 size), this device
    python scripts/benchmark.py --device cuda --presets base --batch-size 32 --gen-batch-size 64
    python scripts/benchmark.py --presets tiny --graphs default,synthetic_100   # memory vs graph size

Per preset (tiny = configs/demo.yaml, base = configs/pretrain_mimic.yaml model sizes, random init,
nothing downloaded) and per anatomy graph (cfg.model.graph), in a fresh subprocess each (so that CPU
peak RSS belongs to that configuration alone):

- train: ``engine.train.train_one_epoch`` itself (forward with every loss of the config, backward,
  clipping, AdamW step; AMP as train.amp resolves on the device) over pre-made batches of synthetic
  chest X-rays: samples/s, peak memory, model FLOPs per sample counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over one real step (forward + backward), and MFU
  against the device's dense peak when it is known (PEAK_FLOPS; CPU: null).
- generate: ``SSACL.generate`` with beam 3 and exactly ``--new-tokens`` new tokens (min_new_tokens =
  max_new_tokens): reports/s, generated tokens/s (best beam's tokens; the beams are computed 3x),
  FLOPs per report, then the scoring time of ``engine.evaluate.score_reports`` (language metrics +
  clinical efficacy) on those reports.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; CPU the process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water mark of the whole
subprocess, which runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors leave the RSS)
and "step memory" = that peak minus the RSS measured just before the timed steps (model, AdamW
states and data already resident): activations, gradients and temporaries of one step. Memory per
sample is the step memory (CPU) or the peak (CUDA) over the batch size. ``--graphs`` repeats the
first preset's training step with a larger anatomy graph (model.graph = synthetic_<leaves>) and
prints the measured increase of memory per sample beside what the extra query tokens alone should
add.

Tokenizers are trained on synthetic reports and padded with unused tokens to the config's
vocab_size, so that the embedding tables and the LM head have the size a real run gets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import contextlib
import io

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from datasets.cxr import MEAN, STD, binarize_labels
from datasets.synthetic import render_study
from datasets.tokenizer import train_bpe, train_wordpiece
from engine.evaluate import score_reports
from engine.optim import autocast, build_optimizer, resolve_amp
from engine.train import train_one_epoch
from models.entity_head import EntityHead
from models.ssacl import SSACL
from utils.config import load_config
from utils.dist import DistInfo, device_for
from vocab.anatomy_graph import graph_from_name
from vocab.report_text import clean_report

PRESETS = {"tiny": "configs/demo.yaml", "base": "configs/pretrain_mimic.yaml"}
# Dense (no sparsity) peak tensor FLOP/s by device-name substring and autocast dtype (datasheets).
PEAK_FLOPS = {
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},   # fp32 = TF32 tensor cores
    "H100 80GB HBM3": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},  # the SXM part's name
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 417.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` when PEAK_FLOPS knows it, else None (CPU:
    None)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first
        if key in name:
            return PEAK_FLOPS[key].get(DTYPE_NAMES[dtype])
    return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- model and data
# -------------------------------------------------------------------------------

def build_config(
    preset_or_path: str,
    graph: str = "default",
    device: str = "auto",
    amp: str | None = None,
    sets: list[str] | None = None,
):
    path = ROOT / PRESETS.get(preset_or_path, preset_or_path)
    cfg = load_config(
        str(path),
        [
            f"model.graph={graph}",
            f"device={device}",
            "model.vit.init=null",
            "model.text.path=null",
            "model.decoder.path=null",
            "model.text.tokenizer=null",
            "model.decoder.tokenizer=null",
        ]
        + list(sets or []),
    )
    if amp:
        cfg.train.amp = amp
    return cfg


def _pad_vocab(tok, size: int, prefix: str):
    """Add unused tokens until the tokenizer has ``size`` entries (the embedding size of a real
    run)."""
    missing = size - len(tok)
    if missing > 0:
        tok.add_tokens([f"<{prefix}{i}>" for i in range(missing)])
    return tok


def synthetic_studies(n: int, size: int, seed: int = 0) -> list[dict]:
    return [render_study(i, size=size, seed=seed) for i in range(n)]


def make_batch(cfg, studies: list[dict], graph, device: torch.device) -> dict:
    """A collated batch (datasets/cxr.py's format) of synthetic studies, on ``device``."""
    imgs = torch.stack([torch.from_numpy(s["image"]).float().div(255) for s in studies])[:, None]
    size = cfg.data.image_size * cfg.data.sr_scale  # the loaded images (the MAE target's size)
    imgs = torch.nn.functional.interpolate(imgs, size=(size,) * 2, mode="bilinear",
                                           antialias=True, align_corners=False)
    anat = []
    for s in studies:
        names = [n for n in s["anatomies"] if n in graph.index]
        anat.append(
            graph.leaf_mask(names) if names else torch.ones(graph.num_leaves, dtype=torch.bool)
        )
    batch = {
        "image": ((imgs - MEAN) / STD).expand(-1, 3, -1, -1).contiguous(),
        "id": [f"bench{i}" for i in range(len(studies))],
        "report": [clean_report(s["report"]) for s in studies],
        "labels": torch.stack(
            [torch.from_numpy(binarize_labels(s["labels"])) for s in studies]
        ).float(),
        "anatomies": torch.stack(anat),
        "index": torch.arange(len(studies)),
    }
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def lm_seq_tokens(model, cfg, studies, graph) -> float:
    """Mean decoder sequence length in training: visual prefix (leaves + CLS + patches) + prompt +
    report."""
    if model.report_decoder is None:
        return 0.0
    labels = torch.stack([torch.from_numpy(binarize_labels(s["labels"])) for s in studies])
    prompts = EntityHead.prompt(labels)
    enc = model.report_decoder.encode
    text = [len(p) + len(r[:cfg.model.decoder.max_report_tokens]) + 2
            for p, r in zip(enc(prompts), enc([clean_report(s["report"]) for s in studies]))]
    visual = graph.num_leaves + 1 + (cfg.data.image_size // cfg.model.vit.patch_size) ** 2
    return visual + sum(text) / len(text)


def build_model(cfg, device: torch.device, reports: list[str]):
    text_tok = _pad_vocab(
        train_wordpiece(reports, cfg.model.text.vocab_size), cfg.model.text.vocab_size, "t"
    )
    dec_tok = _pad_vocab(
        train_bpe(reports, cfg.model.decoder.vocab_size), cfg.model.decoder.vocab_size, "d"
    )
    model = SSACL.from_config(cfg, text_tok, dec_tok)
    if model.needs_location_prior:  # uniform: a step costs the same whatever its values
        model.location_prior.fill_(1.0 / model.vit.num_patches)
    return model.to(device)


# ---- measurements
# ---------------------------------------------------------------------------------

def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def bench_train(model, cfg, batch: dict, device: torch.device, iters: int, warmup: int) -> dict:
    """Times ``engine.train.train_one_epoch`` (the real step) over ``iters`` copies of ``batch``."""

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, distributed=False)
    B = batch["image"].shape[0]
    cfg.data.batch_size = B
    cfg.train.print_freq = 10 ** 9
    cfg.optim.accum_iter = 1  # one optimizer step per timed batch (pretrain_mimic.yaml accumulates 2)
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer, scaler = build_optimizer(cfg, model, info)
    dtype = resolve_amp(cfg.train.amp, device)

    def epoch(n: int) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):
            return train_one_epoch(model, [batch] * n, optimizer, scaler, 0, cfg, device)

    flops = count_flops(lambda: epoch(1))  # one full step (forward + backward + optimizer)
    if warmup:
        epoch(warmup)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    stats = epoch(iters)
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"batch_size": B, "iters": iters, "warmup": warmup, "precision": DTYPE_NAMES[dtype],
           "step_s": dt / iters, "samples_per_s": B * iters / dt, "flops_per_sample": flops / B,
           "loss": float(stats.get("loss", float("nan")))}
    achieved = flops * iters / dt
    peak = peak_flops(device, dtype)
    out["achieved_tflops"] = achieved / 1e12
    out["peak_tflops"] = peak / 1e12 if peak else None
    out["mfu"] = achieved / peak if peak else None
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device)
        out.update(
            memory="cuda max_memory_allocated",
            peak_memory_bytes=mem,
            memory_per_sample_bytes=mem / B,
        )
    else:
        peak_rss = _peak_rss_bytes()
        step = max(peak_rss - rss0, 0)
        out.update(
            memory="cpu peak RSS (getrusage ru_maxrss); step = peak RSS - RSS before the timed steps",
            peak_memory_bytes=peak_rss,
            rss_before_bytes=rss0,
            step_memory_bytes=step,
            memory_per_sample_bytes=step / B,
        )
    return out


def bench_generate(
    model,
    cfg,
    batch: dict,
    device: torch.device,
    iters: int,
    warmup: int,
    beam: int,
    new_tokens: int,
) -> dict:

    model.eval()
    dtype = resolve_amp(cfg.train.amp, device)
    kw = dict(beam_size=beam, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def gen():
        with autocast(device, dtype):
            return model.generate(batch, **kw)

    B = batch["image"].shape[0]
    flops = count_flops(gen)
    for _ in range(warmup):
        gen()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        rows = gen()
    _sync(device)
    dt = time.perf_counter() - t0
    lengths = [len(model.report_decoder.encode([r["report"]])[0]) for r in rows]
    t1 = time.perf_counter()
    scored = [{"index": i, "generated": r["report"], "reference": ref}
              for i, (r, ref) in enumerate(zip(rows, batch["report"]))]
    with contextlib.redirect_stdout(io.StringIO()):  # the clinical-efficacy table
        metrics = score_reports(scored, cfg)
    metrics = metrics[0] if isinstance(metrics, tuple) else metrics  # (flat metrics, full CE dict)
    score_s = time.perf_counter() - t1
    peak = peak_flops(device, dtype)
    achieved = flops * iters / dt
    model.train()
    return {"batch_size": B, "iters": iters, "beam_size": beam, "new_tokens": new_tokens,
            "precision": DTYPE_NAMES[dtype], "reports_per_s": B * iters / dt,
            "tokens_per_s": B * new_tokens * iters / dt, "s_per_batch": dt / iters,
            "flops_per_report": flops / B, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / peak if peak else None,
            "decoded_tokens_mean": sum(lengths) / len(lengths),
            "scoring_s": score_s, "scoring_reports": len(scored),
            "scoring_reports_per_s": len(scored) / score_s if score_s > 0 else None,
            "scoring_metrics": sorted(k for k, v in metrics.items() if v is not None)}


def run_one(
    preset: str = "tiny",
    graph: str = "default",
    device: str = "auto",
    batch_size: int | None = None,
    iters: int = 5,
    warmup: int = 2,
    gen_batch_size: int | None = None,
    gen_iters: int = 1,
    gen_warmup: int = 1,
    beam: int = 3,
    new_tokens: int = 100,
    amp: str | None = None,
    sets: list[str] | None = None,
    skip_generate: bool = False,
) -> dict:
    """Benchmark one preset / graph in this process; returns the result dict (see module
    docstring)."""
    torch.manual_seed(0)
    cfg = build_config(preset, graph, device, amp, sets)
    dev = device_for(cfg.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    g = graph_from_name(graph)
    B = batch_size or cfg.data.batch_size
    GB = gen_batch_size or B
    studies = synthetic_studies(max(B, GB, 64), cfg.data.image_size * cfg.data.sr_scale)
    model = build_model(cfg, dev, [s["report"] for s in studies])
    params = sum(p.numel() for p in model.parameters())
    result = {
        "preset": preset,
        "config": PRESETS.get(preset, preset),
        "graph": graph,
        "graph_nodes": len(g.names),
        "graph_leaves": g.num_leaves,
        "query_tokens": len(g.names) if cfg.loss.region.weight else g.num_leaves,
        "device": str(dev),
        "device_name": device_name(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": params,
        "image_size": cfg.data.image_size,
        "vit": {
            k: cfg.model.vit[k]
            for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        },
        "decoder": {k: cfg.model.decoder[k] for k in ("n_embd", "n_layer", "n_head", "vocab_size")},
        "losses": {k: float(v) for k, v in model.weights.items()},
        "arch": {
            "depth": cfg.model.vit.depth,
            "embed_dim": cfg.model.vit.embed_dim,
            "vit_heads": cfg.model.vit.num_heads,
            "spatial_prior": bool(cfg.model.spatial_prior),
            "patches": (cfg.data.image_size // cfg.model.vit.patch_size) ** 2,
            "mlp_ratio": cfg.model.vit.mlp_ratio,
            "region_depth": cfg.model.region.decoder_depth,
            "region_dim": cfg.model.region.decoder_dim,
            "lm_layers": cfg.model.decoder.n_layer,
            "lm_dim": cfg.model.decoder.n_embd,
            "lm_heads": cfg.model.decoder.n_head,
            "lm_seq_tokens": lm_seq_tokens(model, cfg, studies[:B], g),
        },
    }
    train_batch = make_batch(cfg, studies[:B], g, dev)
    result["train"] = bench_train(model, cfg, train_batch, dev, iters, warmup)
    if not skip_generate and "lm" in model.weights:
        gen_batch = make_batch(cfg, studies[:GB], g, dev)
        result["generate"] = bench_generate(
            model, cfg, gen_batch, dev, gen_iters, gen_warmup, beam, new_tokens
        )
    return result


def expected_query_memory(res_small: dict, res_large: dict) -> dict:
    """Memory per sample that the extra graph nodes should add if nothing but their own tokens
    grows.

    - ViT: a pre-norm block keeps about (8 + 2 * mlp_ratio) * D values per token for backward (LN
      inputs and outputs, qkv, attention output, MLP hidden before and after GELU); every query
      token runs through each ViT pass (two when MAE / contrastive / region reconstruction are on).
      With model.spatial_prior the attention bias needs a gradient, so attention runs the math
      kernel and keeps [heads, T, T] probabilities per layer (T = queries + CLS + patches).
    - Region decoder: one [parent, children...] sequence per inner node, counted the same way.
    - Report decoder: its visual prefix holds every leaf token (a GPT-2 block keeps ~16 * n_embd
      values per token) and, on CPU (math attention), [heads, T, T] attention probabilities over the
      longer sequence.
    - ACA: the [N, K, K] anatomy-similarity logits per image (fp32, ~2 copies kept for backward), N
      = batch.
    A per-node loop that re-ran the encoder or decoder for every node would add whole sequences per
    node instead, orders of magnitude more."""
    a = res_small["arch"]
    bytes_el = 4 if res_small["train"]["precision"] == "fp32" else 2
    per_tok = (8 + 2 * a["mlp_ratio"])
    dq = res_large["query_tokens"] - res_small["query_tokens"]
    w = res_large["losses"]
    passes = 2 if {"mae", "con", "region"} & set(w) else 1
    vit = dq * a["depth"] * per_tok * a["embed_dim"] * passes * bytes_el
    if a.get("spatial_prior"):
        t0 = res_small["query_tokens"] + 1 + a["patches"]
        vit += a["depth"] * a["vit_heads"] * passes * ((t0 + dq) ** 2 - t0 ** 2) * bytes_el
    region = 0.0
    if "region" in w:
        toks = []
        for name in (res_small["graph"], res_large["graph"]):
            idx, _ = graph_from_name(name).child_table
            toks.append(idx.shape[0] * (idx.shape[1] + 1))
        region = (toks[1] - toks[0]) * a["region_depth"] * per_tok * a["region_dim"] * bytes_el
    lm = 0.0
    if "lm" in w:  # the decoder's visual prefix carries every leaf token (plus CLS and patches)
        dk = res_large["graph_leaves"] - res_small["graph_leaves"]
        lm = dk * a["lm_layers"] * (8 + 2 * 4) * a["lm_dim"] * bytes_el
        # math attention: [heads, T, T] probabilities + dropout mask
        if res_small["device"].startswith("cpu"):
            t0 = a["lm_seq_tokens"]
            lm += a["lm_layers"] * a["lm_heads"] * ((t0 + dk) ** 2 - t0 ** 2) * (bytes_el + 1)
    aca = 0.0
    if "aca" in w:
        k0, k1 = res_small["graph_leaves"], res_large["graph_leaves"]
        aca = res_small["train"]["batch_size"] * (k1 ** 2 - k0 ** 2) * 2 * 4
    return {
        "extra_query_tokens": dq,
        "bytes_per_element": bytes_el,
        "expected_vit_bytes": vit,
        "expected_region_bytes": region,
        "expected_lm_bytes": lm,
        "expected_aca_bytes": aca,
        "expected_increase_per_sample_bytes": vit + region + lm + aca,
    }


# ---- driver
# -------------------------------------------------------------------------------------------

def _subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_one",
            json.dumps(spec),
            "--out",
            str(out),
        ]
        # Large blocks straight from mmap and back to the OS when freed: RSS then follows the live
        # tensors, so that peak RSS - RSS before the step measures the step (glibc keeps freed heap
        # otherwise).
        env = dict(
            os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")
        )
        subprocess.run(cmd, check=True, cwd=str(ROOT), env=env)
        return json.loads(out.read_text())


def _fmt_mfu(x) -> str:
    return "n/a (device peak unknown)" if x is None else f"{x:.1%}"


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f} MiB"


def summarize(results: list[dict]) -> str:
    lines = []
    for r in results:
        t = r["train"]
        lines.append(
            f"[{r['preset']} graph={r['graph']} ({r['query_tokens']} query tokens)] {r['device_name']} "
            f"{r['params'] / 1e6:.1f}M params {t['precision']}"
        )
        lines.append(
            f"  train   batch {t['batch_size']}: {t['samples_per_s']:.2f} samples/s, "
            f"{t['step_s'] * 1e3:.0f} ms/step, {t['flops_per_sample'] / 1e9:.2f} GFLOP/sample, "
            f"{t['achieved_tflops']:.3f} TFLOP/s, MFU {_fmt_mfu(t['mfu'])}, "
            f"peak mem {_fmt_bytes(t['peak_memory_bytes'])}, per sample {_fmt_bytes(t['memory_per_sample_bytes'])}"
        )
        g = r.get("generate")
        if g:
            lines.append(
                f"  generate batch {g['batch_size']} beam {g['beam_size']} x {g['new_tokens']} tokens: "
                f"{g['reports_per_s']:.2f} reports/s, {g['tokens_per_s']:.1f} tokens/s, "
                f"{g['flops_per_report'] / 1e9:.2f} GFLOP/report; scoring {g['scoring_reports']} reports "
                f"in {g['scoring_s']:.2f} s"
            )
    return "\n".join(lines)


def graph_scaling(results: list[dict]) -> list[dict]:
    """Memory per sample at two graph sizes of the same preset, beside the query tokens' own
    share."""
    out = []
    by_preset: dict[str, list[dict]] = {}
    for r in results:
        by_preset.setdefault(r["preset"], []).append(r)
    for preset, rs in by_preset.items():
        rs = sorted(rs, key=lambda r: r["query_tokens"])
        for small, large in zip(rs, rs[1:]):
            exp = expected_query_memory(small, large)
            a, b = (
                small["train"]["memory_per_sample_bytes"],
                large["train"]["memory_per_sample_bytes"],
            )
            out.append(
                {
                    "preset": preset,
                    "graphs": [small["graph"], large["graph"]],
                    "query_tokens": [small["query_tokens"], large["query_tokens"]],
                    "memory_per_sample_bytes": [a, b],
                    "measured_increase_per_sample_bytes": b - a,
                    **exp,
                }
            )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--presets", default="tiny,base", help=f"comma list of {sorted(PRESETS)} or config paths"
    )
    p.add_argument(
        "--graphs",
        default="default,synthetic_100",
        help="anatomy graphs (model.graph) to run the FIRST preset with; the others use default",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch (default: config's; CPU base: 2)",
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed training steps (default 10; CPU base: 2)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 3; CPU base: 1)"
    )
    p.add_argument(
        "--gen-batch-size",
        type=int,
        default=None,
        help="reports per generate call (default: batch)",
    )
    p.add_argument("--gen-iters", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--amp", default=None, help="override train.amp (auto | bf16 | fp16 | fp32)")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    p.add_argument("--out", default="output/benchmark.json")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:  # one configuration, in its own process
        res = run_one(**json.loads(args._one))
        Path(args.out).write_text(json.dumps(res, indent=2))
        return res

    on_cpu = device_for(args.device).type == "cpu"
    presets = [s for s in args.presets.split(",") if s]
    specs = []
    for k, preset in enumerate(presets):
        big_on_cpu = on_cpu and preset == "base"
        spec = {
            "preset": preset,
            "device": args.device,
            "amp": args.amp,
            "sets": args.set,
            "batch_size": args.batch_size or (2 if big_on_cpu else None),
            "gen_batch_size": args.gen_batch_size or (2 if big_on_cpu else None),
            "iters": args.iters or (2 if big_on_cpu else 10),
            "warmup": args.warmup if args.warmup is not None else (1 if big_on_cpu else 3),
            "gen_iters": args.gen_iters,
            "gen_warmup": 0 if big_on_cpu else 1,
            "beam": args.beam,
            "new_tokens": args.new_tokens,
        }
        graphs = [g for g in args.graphs.split(",") if g] if k == 0 else ["default"]
        for g in graphs:
            specs.append(dict(spec, graph=g, skip_generate=g != "default"))
    results = []
    for spec in specs:
        print(f"[benchmark] {spec['preset']} graph={spec['graph']} ...", flush=True)
        t0 = time.time()
        results.append(_subprocess(spec))
        print(summarize(results[-1:]) + f"\n  ({time.time() - t0:.0f} s)", flush=True)
    scaling = graph_scaling(results)
    for s in scaling:
        a, b = s["memory_per_sample_bytes"]
        print(
            f"[memory vs graph] {s['preset']}: {s['query_tokens'][0]} -> {s['query_tokens'][1]} query tokens: "
            f"{_fmt_bytes(a)} -> {_fmt_bytes(b)} per sample, "
            f"measured +{_fmt_bytes(s['measured_increase_per_sample_bytes'])}; "
            f"expected from the extra tokens alone ~+{_fmt_bytes(s['expected_increase_per_sample_bytes'])} "
            f"(ViT {_fmt_bytes(s['expected_vit_bytes'])}, region decoder {_fmt_bytes(s['expected_region_bytes'])}, "
            f"LM prefix {_fmt_bytes(s['expected_lm_bytes'])}, ACA KxK {_fmt_bytes(s['expected_aca_bytes'])})"
        )
    return write_report(args.out, results=results, graph_scaling=scaling)


def write_report(out: str, **fields) -> dict:
    """{date, command, **fields} written as JSON to ``out`` (folders made)."""
    report = {"date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **fields}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
