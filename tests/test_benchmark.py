"""scripts/benchmark.py: the core function on the tiny (demo) config, one real step, CPU."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from scripts.benchmark_downstream import main as bench_downstream

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = benchmark
spec.loader.exec_module(benchmark)

FAST = ["eval.meteor=false"]  # no Java process in a unit test


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    return benchmark.run_one(
        "tiny",
        device="cpu",
        batch_size=2,
        iters=1,
        warmup=0,
        gen_batch_size=2,
        gen_iters=1,
        gen_warmup=0,
        beam=3,
        new_tokens=4,
        sets=FAST,
    )


def test_train_fields_positive(result):
    t = result["train"]
    for key in (
        "samples_per_s",
        "step_s",
        "flops_per_sample",
        "achieved_tflops",
        "peak_memory_bytes",
        "memory_per_sample_bytes",
    ):
        assert t[key] > 0, key
    assert t["batch_size"] == 2 and t["precision"] == "fp32"
    assert t["mfu"] is None and t["peak_tflops"] is None  # CPU: peak unknown
    assert "ru_maxrss" in t["memory"]
    # every pretraining loss of the demo config ran in the timed step
    assert set(result["losses"]) == {"mae", "con", "region", "aca", "entity", "lm"}  # location prior off
    assert result["query_tokens"] == 32  # all graph nodes (region reconstruction on)


def test_generate_fields_positive(result):
    g = result["generate"]
    assert g["beam_size"] == 3 and g["new_tokens"] == 4
    for key in ("reports_per_s", "tokens_per_s", "flops_per_report", "scoring_s"):
        assert g[key] > 0, key
    assert g["tokens_per_s"] == pytest.approx(g["reports_per_s"] * 4)
    assert g["mfu"] is None
    assert {"BLEU_4", "ce_micro_f1_14"} <= set(g["scoring_metrics"])


def test_flops_grow_with_graph_and_peak_table():
    small = benchmark.run_one(
        "tiny",
        graph="synthetic_40",
        device="cpu",
        batch_size=2,
        iters=1,
        warmup=0,
        skip_generate=True,
        sets=FAST,
    )
    assert small["graph_leaves"] == 40 and small["query_tokens"] == small["graph_nodes"] > 40
    assert small["train"]["flops_per_sample"] > 0
    assert benchmark.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert benchmark.PEAK_FLOPS["H100 SXM"]["bf16"] == 989e12


def test_downstream_benchmark_times_zeroshot_and_finetuning(tmp_path):
    out = tmp_path / "bd.json"
    res = bench_downstream(["--device", "cpu", "--presets", "tiny", "--zs-images", "12",
                            "--zs-batch-size", "8", "--batch-size", "2", "--iters", "1",
                            "--out", str(out)])["results"][0]
    assert res["zeroshot"]["images"] == 12 and res["zeroshot"]["images_per_s"] > 0
    full, probe = res["classification_full"], res["classification_linear_probe"]
    assert full["samples_per_s"] > 0 and res["segmentation_full"]["samples_per_s"] > 0
    # the probe's frozen encoder runs no backward: fewer FLOPs per sample than full fine-tuning
    assert probe["flops_per_sample"] < full["flops_per_sample"]
    assert out.is_file()
