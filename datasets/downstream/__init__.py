"""Downstream datasets of SS-ACL (fine-tuning, zero-shot, retrieval, grounding), read in their
official formats; ``python -m datasets.synthetic_downstream`` writes synthetic counterparts of all
five in the same formats.

Contract::

    from datasets.downstream import build_downstream, TASKS, collate_downstream
    TASKS = ("nih", "rsna", "siim", "chexpert5x200", "mscxr")
    ds = build_downstream(task, root, split, image_size, *, train=False, fraction=1.0,
                          split_file=None, seed=0)

- ``root``: the dataset folder in the official layout (images, annotation and split files; each
  task's module docstring names them). ``split``: "train" | "val" | "test". ``fraction`` (0.01,
  0.1, 1.0; train only, val/test are always whole): the official split file of that fraction
  (e.g. NIH train_1.txt / train_10.txt / train_list.txt) when root has it, else a deterministic
  seeded subset of the 100% file whose every prefix holds a positive of each label
  (``common.covering_order``; subsets of one seed are nested). ``split_file`` replaces the file
  (taken whole). Missing files or fields raise DataError naming the file and the field.
- Every item is a dict with "image": float [1, S, S] (``datasets.cxr.load_image`` then
  ``build_transform(S, train)``, pretraining's normalisation; one channel: expand to 3 for the
  ViT) and "id": str; by task:
    nih, rsna      "labels" float [C] (C = 14 in NIH's official order, 1 for RSNA)
    siim           "mask" float [1, S, S] in {0, 1}, aligned with the image (train: the same
                   random crop on both); "labels" float [1] (mask not empty)
    chexpert5x200  "labels" one-hot float [5] over label_names, "caption" str
    mscxr          "phrase" str, "label" (category) str, "box_mask" float [S, S] (union of the
                   phrase's boxes in the resized image); one item per (image, phrase); eval only
  ``ds.label_names``: list[str] (for mscxr the categories present).
- An unreadable image makes its item None (logged; ``ds.bad_counts()``);
  ``collate_downstream`` stacks tensors, keeps strings as lists and drops None items.
- Synthetic layout: ``data/synthetic_downstream/{nih,rsna,siim,chexpert5x200,mscxr}/``, each a
  ``root`` for its task.
"""
from __future__ import annotations

from datasets.downstream.chexpert5x200 import build_chexpert5x200
from datasets.downstream.common import FRACTIONS, SPLITS, Indexed, check_args, collate_downstream
from datasets.downstream.mscxr import build_mscxr
from datasets.downstream.nih import build_nih
from datasets.downstream.rsna import build_rsna
from datasets.downstream.siim import build_siim

TASKS = ("nih", "rsna", "siim", "chexpert5x200", "mscxr")
BUILDERS = {"nih": build_nih, "rsna": build_rsna, "siim": build_siim,
            "chexpert5x200": build_chexpert5x200, "mscxr": build_mscxr}

__all__ = ["TASKS", "SPLITS", "FRACTIONS", "Indexed", "build_downstream", "collate_downstream"]


def build_downstream(task: str, root, split: str, image_size: int, *, train: bool = False,
                     fraction: float = 1.0, split_file=None, seed: int = 0):
    """The ``split`` of downstream ``task`` read from ``root`` (see the module docstring)."""
    if task not in BUILDERS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_args(split, fraction)
    return BUILDERS[task](root, split, image_size, train=train, fraction=fraction,
                          split_file=split_file, seed=seed)
