import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import MARKER, generate, leaf_file, main, render_study
from datasets.synthetic_reports import BILATERAL, FINDINGS
from vocab.anatomy_graph import AnatomyGraph
from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX
from vocab.report_text import clean_report

GRAPH = AnatomyGraph.default()
RIGHT = set(GRAPH.leaves_under("right lung")) | {"right clavicle"}
LEFT = set(GRAPH.leaves_under("left lung")) | {"left clavicle"}
MENTION = {
    "opacity": "opacity",
    "consolidation": "consolidation",
    "nodule": "nodule",
    "atelectasis": "atelectasis",
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "edema": "pulmonary edema",
    "cardiomegaly": ("cardiomegaly", "heart is enlarged"),
    "fracture": "fracture",
    "support_device": ("catheter", "central line"),
    "widened_mediastinum": ("widened", "widening"),
    "hilar_mass": "mass",
    "endotracheal_tube": "endotracheal tube",
    "enteric_tube": ("enteric tube", "nasogastric tube"),
    "vertebral_fracture": "compression fracture",
    "elevated_hemidiaphragm": ("elevated", "elevation"),
    "aortic_calcification": "calci",
}
SIZE = 96


@pytest.fixture(scope="module")
def studies():
    return [render_study(i, SIZE, seed=3) for i in range(160)]


def test_seeded_and_deterministic():
    a, b, c = render_study(7, 64, seed=1), render_study(7, 64, seed=1), render_study(7, 64, seed=2)
    assert np.array_equal(a["image"], b["image"]) and a["report"] == b["report"]
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.uint8 and a["image"].shape == (64, 64)
    assert sorted(a["regions"]) == sorted(GRAPH.leaf_names)          # every leaf is drawn


def test_finding_mix(studies):
    n_find = [len({f["type"] for f in s["findings"]}) for s in studies]
    assert 0.2 <= n_find.count(0) / len(studies) <= 0.4
    assert max(n_find) == 3
    types = Counter(f["type"] for s in studies for f in s["findings"])
    assert set(types) == set(FINDINGS) and len(FINDINGS) >= 8


def test_masks_regions_and_laterality(studies):
    for s in studies:
        leaves = [f["anatomy"] for f in s["findings"]]
        assert len(leaves) == len(set(leaves))                      # distinct leaves
        for f in s["findings"]:
            assert f["anatomy"] in GRAPH.leaf_index and f["observation"] == FINDINGS[f["type"]][0]
            m = f["mask"]
            assert m.shape == (SIZE, SIZE) and m.sum() > 0
            assert (m & s["regions"][f["anatomy"]]).sum() >= 0.8 * m.sum(), f
            cx = np.nonzero(m)[1].mean()
            # patient's right = image's left
            if f["anatomy"] in RIGHT:
                assert cx < SIZE / 2, f
            if f["anatomy"] in LEFT:
                assert cx > SIZE / 2, f
        for side, leaves_ in (("right", RIGHT), ("left", LEFT)):
            for leaf in leaves_:
                cx = np.nonzero(s["regions"][leaf])[1].mean()
                assert (cx < SIZE / 2) == (side == "right"), leaf


def test_findings_are_visible(studies):
    for s in studies:
        img = s["image"].astype(np.float32)
        lungs = s["regions"]["right upper lung zone"] | s["regions"]["right mid lung zone"] | \
            s["regions"]["right lower lung zone"] | s["regions"]["left upper lung zone"] | \
            s["regions"]["left mid lung zone"] | s["regions"]["left lower lung zone"]
        hit = np.zeros_like(lungs)
        for f in s["findings"]:
            hit |= f["mask"]
        clear = lungs & ~hit
        for f in s["findings"]:
            if f["type"] in (
                "opacity",
                "consolidation",
                "nodule",
                "atelectasis",
                "effusion",
                "edema",
                "hilar_mass",
            ):
                assert img[f["mask"]].mean() > img[clear].mean() + 20, f["type"]
            if f["type"] == "pneumothorax":
                assert img[f["mask"]].mean() < img[clear].mean(), f["type"]


def test_devices_and_bony_findings_are_visible(studies):
    """Tubes, a compressed vertebra, a calcified knob, a hilar mass: brighter than the same leaf
    region in normal studies; an elevated hemidiaphragm lies above the other side's."""
    normal = [s for s in studies if not s["findings"]]
    for t in (
        "endotracheal_tube",
        "enteric_tube",
        "vertebral_fracture",
        "aortic_calcification",
        "hilar_mass",
    ):
        hits = [(s, f) for s in studies for f in s["findings"] if f["type"] == t]
        assert hits, t
        # 90th percentile: a thin tube fills a small part of its tip's disc
        inside = np.mean([np.percentile(s["image"][f["mask"]], 90) for s, f in hits])
        usual = np.mean(
            [
                np.percentile(n["image"][n["regions"][f["anatomy"]]], 90)
                for _, f in hits
                for n in normal
            ]
        )
        assert inside > usual + 15, (t, inside, usual)
    for s in studies:
        for f in s["findings"]:
            if f["type"] == "elevated_hemidiaphragm":
                other = ("left" if f["anatomy"].startswith("right") else "right") + " hemidiaphragm"
                assert (
                    np.nonzero(f["mask"])[0].mean() < np.nonzero(s["regions"][other])[0].mean() - 2
                )


def test_report_mentions_findings_and_labels(studies):
    for s in studies:
        report = clean_report(s["report"])
        sentences = report.split(" . ")
        types = {f["type"] for f in s["findings"]}
        for f in s["findings"]:
            words = MENTION[f["type"]]
            words = (words,) if isinstance(words, str) else words
            sent = [x for x in sentences if any(w in x for w in words)]
            assert sent, (f["type"], report)
            side = f["anatomy"].split()[0]
            if f["anatomy"] in RIGHT | LEFT and f["type"] not in BILATERAL:
                assert any(side in x for x in sent), (f, report)
        for word in ("possible", "may", "cannot be excluded", "likely", "suggest"):
            assert word not in report
        pos = {CHEXPERT_OBSERVATIONS[i] for i, v in enumerate(s["labels"]) if v == 1}
        expected = {FINDINGS[t][0] for t in types} - {None}
        # devices and unlabelled findings only
        if expected <= {"Support Devices"}:
            expected.add("No Finding")
        assert pos == expected, (report, pos)
        assert all(v in (None, 0.0, 1.0) for v in s["labels"]) and len(s["labels"]) == 14
        if not types:
            assert s["anatomies"] == [] and "the lungs are" in report
            assert s["labels"][OBSERVATION_INDEX["Pleural Effusion"]] == 0
        else:
            assert {f["anatomy"] for f in s["findings"]} <= set(s["anatomies"])
            if "cardiomegaly" in types:
                assert {"right atrium", "cavoatrial junction"} <= set(s["anatomies"])
            # a low tube runs through the trachea
            if any(f["anatomy"] == "carina" for f in s["findings"]):
                assert "trachea" in s["anatomies"]


def test_generate_layout_and_workers_agree(tmp_path):
    ann = generate(tmp_path / "a", 12, size=48, seed=5, workers=1)
    data = json.loads(ann.read_text())
    assert all(len(data[sp]) > 0 for sp in ("train", "val", "test"))
    assert sum(len(v) for v in data.values()) == 12
    for sp, recs in data.items():
        for r in recs:
            assert r["split"] == sp and r["image_path"] == [f"{r['id']}.png"]
            img = Image.open(ann.parent / "images" / r["image_path"][0])
            assert img.mode == "L" and img.size == (48, 48)
            assert set(r["regions"]) == set(GRAPH.leaf_names)
            for leaf, rel in r["regions"].items():
                assert rel == f"masks/{r['id']}/{leaf_file(leaf)}"
            for k, f in enumerate(r["findings"]):
                assert f["mask"] == f"masks/{r['id']}/finding_{k}.png"
                m = np.asarray(Image.open(ann.parent / f["mask"]))
                assert m.dtype == np.uint8 and m.shape == (48, 48) and set(np.unique(m)) <= {0, 255}
    ann2 = generate(tmp_path / "b", 12, size=48, seed=5, workers=2)
    assert ann2.read_text() == ann.read_text()
    for r in data["train"]:
        a = (tmp_path / "a" / "images" / f"{r['id']}.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / f"{r['id']}.png").read_bytes()


def test_cli_prints_speed(tmp_path, capsys):
    main(["--out", str(tmp_path / "c"), "--n", "6", "--size", "32", "--workers", "1"])
    out = capsys.readouterr().out
    assert "studies/s" in out and (tmp_path / "c" / "annotation.json").is_file()


def test_a_folder_it_did_not_make_is_refused_unless_overwrite(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "precious.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(mine), "--n", "3", "--size", "32", "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {mine} is not empty and was not made by datasets.synthetic" in err
    assert "--overwrite" in err and (mine / "images" / "precious.png").is_file()
    with pytest.raises(FileExistsError, match="not made by datasets.synthetic"):
        generate(mine, 3, size=32, workers=1)
    # its own folder is rewritten without asking; another one with --overwrite
    generate(tmp_path / "own", 3, size=32, workers=1)
    generate(tmp_path / "own", 3, size=32, workers=1)
    main(["--out", str(mine), "--n", "3", "--size", "32", "--workers", "1", "--overwrite"])
    assert not (mine / "images" / "precious.png").exists() and (mine / MARKER).is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "deleting its images/ and masks/" in " ".join(capsys.readouterr().out.split())
