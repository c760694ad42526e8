"""scripts/downstream_summary.py: seeds averaged, baselines beside, targets judged."""
import json

import pytest

from scripts.downstream_summary import main


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _zeroshot(auroc, p1, text_miou, cls_miou):
    out = {f"classification/{t}/auroc_macro": auroc for t in ("nih", "rsna", "chexpert5x200")}
    out.update({f"retrieval/chexpert5x200/{d}/P@1": p1 for d in ("i2t", "t2i")})
    for m, v in (("text", text_miou), ("cls", cls_miou), ("prior", 0.2)):
        out.update({f"grounding/mscxr/{m}/miou": v, f"grounding/mscxr/{m}/cnr": v,
                    f"grounding/mscxr/{m}/pointing_game": v})
    return out


def test_table_averages_seeds_and_judges_targets(tmp_path):
    values = {("cls1", "ssacl"): [0.70, 0.80], ("cls1", "random"): [0.60, 0.62],
              ("probe", "ssacl"): [0.85, 0.83], ("probe", "random"): [0.55, 0.57],
              ("seg10", "ssacl"): [0.40, 0.44], ("seg10", "random"): [0.40, 0.40]}
    for (run, init), per_seed in values.items():
        key = "dice" if run == "seg10" else "auroc"
        for seed, v in zip(("0", "1"), per_seed):
            _write(tmp_path / f"{run}_{init}_s{seed}" / "eval_test" / "metrics.json",
                   {"metrics": {key: v}})
    _write(tmp_path / "zeroshot" / "zeroshot_test" / "metrics.json", _zeroshot(0.9, 0.5, 0.3, 0.1))
    _write(tmp_path / "zeroshot" / "zeroshot_test_random_init" / "metrics.json",
           _zeroshot(0.5, 0.2, 0.1, 0.1))
    rows = {(r["task"], r["metric"]): r for r in main(["--out", str(tmp_path), "--seeds", "0 1"])}

    cls = rows[("NIH-like, 1% labels, full fine-tuning", "auroc")]
    assert cls["ssacl"][0] == pytest.approx(0.75) and cls["baseline"][0] == pytest.approx(0.61)
    assert cls["ssacl"][1] == pytest.approx(0.0707, abs=1e-4)  # sample std of 0.70, 0.80
    assert cls["met"]  # 0.75 >= 0.61 + 0.10
    assert not rows[("SIIM-like, 10% labels, segmentation", "dice")]["met"]  # 0.42 < 0.40 + 0.05
    assert rows[("NIH-like, linear probe (all labels)", "auroc")]["met"]
    assert not rows[("5x200-like retrieval, i2t", "P@1 (chance 0.2)")]["met"]
    assert rows[("MS-CXR-like grounding: text-prompted vs official CLS", "miou")]["met"]
    assert (tmp_path / "summary.json").is_file()


def test_missing_run_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match="cls1_ssacl_s0"):
        main(["--out", str(tmp_path), "--seeds", "0"])
