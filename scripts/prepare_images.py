"""Resize a folder of chest X-rays once into a cache (MIMIC-CXR JPGs are ~2500 px).

    python scripts/prepare_images.py SRC DST --size 512 [--workers N]

Every image under SRC (jpg, jpeg, png, tif, tiff, bmp; recursively) is written to the same
relative path under DST with its shorter side resized to --size (aspect kept, never
enlarged; smaller images are copied as they are), in its own format and mode (16-bit PNGs
stay 16-bit). Point ``data.image_root`` at DST: the annotation's image paths stay valid.

Resumable: files already in DST are skipped, and each file is written to a temporary
name and renamed, so an interrupted run leaves no partial images. Runs on all cores with a
progress bar; unreadable files are listed by name at the end (exit status 1 if any).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


def _resize(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if im.mode.startswith("I;16") and im.mode != "I;16":
        im = im.convert("I")  # big-endian 16-bit: resample as 32-bit ints
    return im.resize(
        new, Image.Resampling.LANCZOS if im.mode in ("L", "RGB") else Image.Resampling.BILINEAR
    )


def process(job) -> tuple[str, str, str]:
    """(relative path, "done" | "skipped" | "failed", error)."""
    src, dst, rel, size = job
    out = Path(dst) / rel
    if out.exists():
        return rel, "skipped", ""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(Path(src) / rel) as im:
            if min(im.size) <= size:
                im.load()                       # check it is readable, then copy it untouched
                shutil.copyfile(Path(src) / rel, tmp)
            else:
                if im.format == "JPEG":         # decode at a reduced scale (still >= size)
                    w, h = im.size
                    k = size / min(w, h)
                    im.draft(im.mode, (int(w * k) + 1, int(h * k) + 1))
                im.load()
                small = _resize(im, size)
                fmt = FORMATS[out.suffix.lower()]
                kw = (
                    {"quality": 95}
                    if fmt == "JPEG"
                    else {"compress_level": 3}
                    if fmt == "PNG"
                    else {}
                )
                small.save(tmp, format=fmt, **kw)
        os.replace(tmp, out)
        return rel, "done", ""
    except Exception as e:  # unreadable / corrupt: reported at the end
        tmp.unlink(missing_ok=True)
        return rel, "failed", f"{type(e).__name__}: {e}"


def find_images(src: Path) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in src.rglob("*")
                  if p.is_file() and p.suffix.lower() in EXTS and not p.name.startswith("."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", type=int, default=512, help="shorter side in pixels")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if not args.src.is_dir():
        ap.error(f"{args.src} is not a folder")
    files = find_images(args.src)
    jobs = [(str(args.src), str(args.dst), rel, args.size) for rel in files]
    results: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    with Pool(max(1, min(args.workers, len(jobs) or 1))) as pool:
        it = pool.imap_unordered(
            process, jobs, chunksize=max(1, min(64, len(jobs) // (8 * args.workers) or 1))
        )
        for rel, status, err in tqdm(it, total=len(jobs), desc="resizing", unit="img"):
            results[status].append((rel, err))
    print(f"{args.dst}: {len(results['done'])} resized, {len(results['skipped'])} already done, "
          f"{len(results['failed'])} unreadable (of {len(files)} images, shorter side {args.size})")
    for rel, err in sorted(results["failed"]):
        print(f"  unreadable: {args.src / rel}: {err}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
