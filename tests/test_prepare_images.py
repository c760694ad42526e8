import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_images.py"
spec = importlib.util.spec_from_file_location("prepare_images", SCRIPT)
prepare_images = importlib.util.module_from_spec(spec)
# so that Pool workers can unpickle its functions
sys.modules["prepare_images"] = prepare_images
spec.loader.exec_module(prepare_images)


def make_src(src: Path):
    (src / "p10" / "s1").mkdir(parents=True)
    grad = np.tile(np.linspace(0, 255, 200).astype(np.uint8), (100, 1))
    Image.fromarray(grad).save(src / "a.png")  # L, 200x100
    Image.fromarray(np.full((300, 120, 3), 90, np.uint8)).save(
        src / "p10" / "s1" / "b.jpg", quality=95
    )
    Image.fromarray(np.full((160, 160), 40000, np.uint16)).save(src / "deep.png")       # 16-bit
    # below --size
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(src / "small.png")
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "notes.txt").write_text("not an image")


def test_resize_resume_and_report(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_src(src)
    assert prepare_images.main([str(src), str(dst), "--size", "64", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "4 resized" in out and "1 unreadable" in out and str(src / "bad.png") in out
    a = Image.open(dst / "a.png")
    assert a.size == (128, 64) and a.mode == "L"
    # not flipped
    assert np.asarray(a)[:, :10].mean() < 30 and np.asarray(a)[:, -10:].mean() > 225
    b = Image.open(dst / "p10" / "s1" / "b.jpg")
    assert b.size == (64, 160) and b.format == "JPEG" and abs(np.asarray(b).mean() - 90) < 3
    deep = Image.open(dst / "deep.png")
    assert (
        deep.mode.startswith("I")
        and deep.size == (64, 64)
        and abs(np.asarray(deep).mean() - 40000) < 2
    )
    assert (dst / "small.png").read_bytes() == (src / "small.png").read_bytes()
    assert not (dst / "bad.png").exists() and not (dst / "notes.txt").exists()
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]

    mtime = (dst / "a.png").stat().st_mtime_ns
    assert prepare_images.main([str(src), str(dst), "--size", "64", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "0 resized" in out and "4 already done" in out and "bad.png" in out
    assert (dst / "a.png").stat().st_mtime_ns == mtime


def test_interrupted_tmp_file_is_not_taken_as_done(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_src(src)
    (src / "bad.png").unlink()
    dst.mkdir()
    (dst / ".a.png.tmp123").write_bytes(b"partial")       # left by a killed run
    assert prepare_images.main([str(src), str(dst), "--size", "64", "--workers", "1"]) == 0
    assert Image.open(dst / "a.png").size == (128, 64)
    assert "4 resized" in capsys.readouterr().out
