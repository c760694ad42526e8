"""Shared by the tests: tiny synthetic data, a tiny SS-ACL config (CPU, seconds), child
processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "vit": {
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "stem": "patch",
    },
    "text": {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "max_length": 64,
    },
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "region": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "decoder": {
        "vocab_size": 300,
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 512,
        "max_report_tokens": 48,
    },
}


def synthetic(root: Path, n: int = 40, size: int = 48) -> Path:
    """n synthetic studies (80/10/10 split) under root; returns annotation.json."""
    from datasets.synthetic import generate
    return generate(root, n, size=size, seed=0, workers=1)


def write_config(
    path: Path,
    annotation: Path,
    output_dir: Path,
    run_name: str = "run",
    base: str = "demo.yaml",
    **sections,
) -> Path:
    """A config file over configs/<base> with tiny sizes, the data at ``annotation``, and
    ``sections`` merged in (e.g. optim={"epochs": 2})."""
    cfg = {
        "base": str(REPO / "configs" / base),
        "run_name": run_name,
        "output_dir": str(output_dir),
        "data": {
            "annotation": str(annotation),
            "image_root": str(Path(annotation).parent / "images"),
            "image_size": 32,
            "batch_size": 4,
            "eval_batch_size": 4,
            "num_workers": 0,
        },
        "model": TINY_MODEL,
        "train": {"print_freq": 5},
        "eval": {"beam_size": 1, "max_new_tokens": 12, "min_new_tokens": 0, "num_visualize": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)


def env() -> dict:
    """This environment for a child process: the repo importable, one thread, no torchrun
    variables."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for k in TORCHRUN_ENV:
        e.pop(k, None)
    return e


def python(*args, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python args...`` in the repo (a fresh process, as a user would)."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return python(
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
        timeout=timeout,
    )


XRV_WHEEL = REPO / ".cache" / "wheels" / "torchxrayvision-1.5.7-py3-none-any.whl"


def xrv_file(name: str) -> bytes:
    """A real annotation file shipped in the torchxrayvision wheel (``torchxrayvision/data/<name>``),
    read from the wheel at test time; the test skips, naming the wheel, where it is absent."""
    if not XRV_WHEEL.is_file():
        pytest.skip(f"{XRV_WHEEL} is absent (scripts/setup_env.sh downloads it with pip)")
    with zipfile.ZipFile(XRV_WHEEL) as wheel:
        return wheel.read(f"torchxrayvision/data/{name}")
