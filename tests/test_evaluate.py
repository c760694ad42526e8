"""engine/evaluate.py: validation loss, generation + scoring + files + TensorBoard, synthetic
grounding."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from datasets.cxr import build_dataset, collate
from engine.evaluate import evaluate_loss, generate_and_score
from tests.helpers import free_port, synthetic, write_config
from utils.config import load_config
from vocab.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()


class Recorder:
    def __init__(self):
        self.scalars, self.texts, self.images = [], [], []

    def add_scalars(self, values, step, prefix=""):
        self.scalars.append((prefix, step, dict(values)))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text))

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, np.asarray(image).shape, dataformats))


class MeanLoss(nn.Module):
    """loss = mean over the batch of the image's first pixel; 'double' = twice that."""

    def forward(self, batch):
        v = batch["image"][:, 0, 0, 0]
        return {"loss": v.mean(), "double": 2 * v.mean()}


def test_evaluate_loss_is_the_sample_weighted_mean():
    data = [{"image": torch.full((3, 2, 2), float(i)), "id": str(i), "index": i} for i in range(7)]
    loader = DataLoader(data, batch_size=3, collate_fn=lambda items: {
        "image": torch.stack([d["image"] for d in items]), "id": [d["id"] for d in items],
        "index": torch.tensor([d["index"] for d in items])})
    out = evaluate_loss(MeanLoss(), loader, "cpu", "auto")  # batches of 3, 3, 1
    assert out == pytest.approx({"loss": 3.0, "double": 6.0, "num_skipped": 0})


class Counted(list):
    """Items with bad_counts (as datasets/cxr.py has); a None item has no readable image."""

    def bad_counts(self):
        return {"missing_image": 1, "unreadable_image": sum(i is None for i in self)}


def test_evaluate_loss_skips_an_empty_batch_and_counts_the_skipped():
    data = Counted([{"image": torch.full((3, 2, 2), float(i)), "id": str(i), "index": i} for i in range(6)])
    data[3] = data[4] = data[5] = None  # the second batch has no readable sample

    def collate_readable(items):
        items = [d for d in items if d is not None]
        return {"image": torch.stack([d["image"] for d in items]), "id": [d["id"] for d in items],
                "index": torch.tensor([d["index"] for d in items])} if items else None

    loader = DataLoader(data, batch_size=3, collate_fn=collate_readable)
    out = evaluate_loss(MeanLoss(), loader, "cpu")
    assert out == pytest.approx({"loss": 1.0, "double": 2.0, "num_skipped": 4})
    with pytest.raises(ValueError, match="no readable sample"):
        evaluate_loss(MeanLoss(), DataLoader(Counted([None]), collate_fn=collate_readable), "cpu")


class Oracle(nn.Module):
    """A stand-in for SSACL: generates the reference (or a fixed text), and heatmaps that are the
    synthetic region masks themselves (or noise)."""

    leaf_names = GRAPH.leaf_names

    def __init__(self, regions: dict, root, perfect: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.regions, self.root, self.perfect = regions, root, perfect
        self.current_ids = []

    def forward(self, batch):
        return {"loss": self.w.sum()}

    def generate(
        self,
        batch,
        beam_size=1,
        max_new_tokens=100,
        min_new_tokens=0,
        repetition_penalty=1.0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
    ):
        self.current_ids = list(batch["id"])
        reports = batch["report"] if self.perfect else ["the heart is normal ."] * len(batch["id"])
        return [{"id": i, "report": r, "entities": ["Cardiomegaly"], "anatomies": ["lungs"]}
                for i, r in zip(batch["id"], reports)]

    def heatmaps(self, images):
        B, _, H, W = images.shape
        if not self.perfect:
            return torch.rand(B, GRAPH.num_leaves, H, W, generator=torch.Generator().manual_seed(0))
        maps = torch.zeros(B, GRAPH.num_leaves, H, W)
        for b, sid in enumerate(self.current_ids):
            for leaf, rel in self.regions[sid].items():
                with Image.open(self.root / rel) as im:
                    m = np.asarray(im.convert("L").resize((W, H), Image.NEAREST)) > 127
                maps[b, GRAPH.leaf_index[leaf]] = torch.from_numpy(m).float()
        return maps

    def prior_heatmaps(self, image_size):
        return None


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    ann = synthetic(tmp / "data", n=30)
    cfg = load_config(
        write_config(
            tmp / "cfg.yaml", ann, tmp / "out", eval={"num_visualize": 2, "num_text_samples": 3}
        )
    )
    records = {r["id"]: r for r in json.load(open(ann))["test"]}
    return tmp, cfg, records


def _loader(dataset, indices, batch_size=2):
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate)


def test_generate_and_score_perfect_oracle(synth):
    tmp, cfg, records = synth
    dataset = build_dataset(cfg, "test", train=False)
    n = len(dataset)
    model = Oracle({k: r["regions"] for k, r in records.items()}, tmp / "data")
    # indices with repeats, as DistributedSampler pads shards: every study must be scored once
    loader = _loader(dataset, list(range(n)) + [0, 1])
    tb = Recorder()
    out_dir = tmp / "out" / "perfect"
    metrics = generate_and_score(
        model, loader, "cpu", cfg, out_dir, tb=tb, epoch=3, prefix="val", split="test"
    )

    rows = [json.loads(line) for line in open(out_dir / "generated.jsonl")]
    assert [r["id"] for r in rows] == [dataset.samples[i].id for i in range(n)]
    assert set(rows[0]) == {"id", "generated", "reference", "entities", "anatomies"}
    assert all(r["generated"] == r["reference"] for r in rows)
    saved = json.load(open(out_dir / "metrics.json"))
    assert saved["num_studies"] == metrics["num_studies"] == n
    assert (
        "per_observation" in saved["clinical_efficacy"]["all"]
        or "per_observation" in saved["clinical_efficacy"]
    )
    assert metrics["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and metrics[
        "ROUGE_L"
    ] == pytest.approx(1.0)
    if shutil.which("java"):
        assert metrics["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["ce_micro_f1_14"] == pytest.approx(1.0)
    assert metrics["pointing_game"] == 1.0 and metrics["cnr"] > 2.0  # the heatmaps are the masks

    prefix, step, logged = tb.scalars[0]
    assert prefix == "val" and step == 3 and logged["BLEU_4"] == metrics["BLEU_4"]
    assert len(tb.texts) == 3 and "**reference:**" in tb.texts[0][1]
    assert tb.images and all(shape[-1] == 3 for _, shape, fmt in tb.images)  # HWC overlays
    assert len({os.path.basename(p).split("_s")[0] for p in os.listdir(out_dir / "overlays")
                if p.endswith(".png")}) == 2


def test_generate_and_score_poor_model_scores_lower(synth):
    tmp, cfg, records = synth
    dataset = build_dataset(cfg, "test", train=False)
    model = Oracle({k: r["regions"] for k, r in records.items()}, tmp / "data", perfect=False)
    cfg = load_config(None, [f"data.annotation={cfg.data.annotation}", "eval.meteor=false"])
    metrics = generate_and_score(model, _loader(dataset, list(range(len(dataset)))), "cpu", cfg,
                                 tmp / "out" / "poor", prefix="test", num_visualize=0)
    assert metrics["BLEU_4"] < 0.5 and metrics["pointing_game"] < 0.5 and metrics["cnr"] < 1.0
    assert metrics["METEOR"] is None  # eval.meteor=false
    assert not (tmp / "out" / "poor" / "overlays").exists()


def test_generate_and_score_unwraps_ddp(synth):
    tmp, cfg, records = synth
    dataset = build_dataset(cfg, "test", train=False)
    model = Oracle({k: r["regions"] for k, r in records.items()}, tmp / "data")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    tdist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = load_config(None, [f"data.annotation={cfg.data.annotation}", "eval.meteor=false"])
        metrics = generate_and_score(
            ddp,
            _loader(dataset, [0, 1, 2]),
            "cpu",
            cfg,
            tmp / "out" / "ddp",
            prefix="test",
            num_visualize=0,
        )
    finally:
        tdist.destroy_process_group()
    assert metrics["num_studies"] == 3 and metrics["BLEU_4"] == pytest.approx(1.0, abs=1e-6)




def test_generate_and_score_counts_skipped_inputs_in_metrics_json(synth, tmp_path):
    tmp, cfg, records = synth
    images = shutil.copytree(tmp / "data" / "images", tmp_path / "images")
    bad = sorted(records)[0]
    (images / f"{bad}.png").write_bytes(b"\x89PNG truncated")
    cfg = load_config(None, [f"data.annotation={cfg.data.annotation}", f"data.image_root={images}",
                             "data.skip_bad=true", "eval.meteor=false"])
    dataset = build_dataset(cfg, "test", train=False)
    model = Oracle({k: r["regions"] for k, r in records.items()}, tmp / "data")
    metrics = generate_and_score(model, _loader(dataset, list(range(len(dataset)))), "cpu", cfg,
                                 tmp_path / "out", prefix="test", num_visualize=0)
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert saved["skipped"] == {"bad_record": 0, "empty_report": 0, "non_latin_report": 0, "no_frontal": 0,
                                "missing_image": 0, "unreadable_image": 1}
    assert saved["num_skipped"] == metrics["num_skipped"] == 1
    assert metrics["num_studies"] == len(dataset) - 1
    rows = [json.loads(line) for line in open(tmp_path / "out" / "generated.jsonl")]
    assert bad not in [r["id"] for r in rows]
