"""scripts/text_agreement.py: the printed gold-set table and the synthetic agreement."""
import json

from tests.helpers import REPO, XRV_WHEEL, python, synthetic, xrv_file


def test_gold_table_and_synthetic_agreement(tmp_path):
    xrv_file("NLMCXR_reports.tgz")                      # skips where the wheel is absent
    ann = synthetic(tmp_path / "syn", n=30, size=32)
    proc = python("scripts/text_agreement.py", "--gold", REPO / "tests/helpers/iu_xray_gold.json",
                  "--reports", XRV_WHEEL, "--synthetic", ann, timeout=600)
    out = proc.stdout.splitlines()
    assert out[0].startswith("tune      n=111  labels micro P ")
    assert out[2].startswith("all       n=222")
    f1 = float(out[2].split("labels micro")[1].split("F1")[1].split()[0])
    assert f1 >= 0.90
    rows = [line for line in out if line.startswith(("Cardiomegaly ", "right costophrenic angle "))]
    assert len(rows) == 2 and all(len(r.split()) >= 5 for r in rows)
    n = sum(len(v) for v in json.loads(ann.read_text()).values())
    assert any(line.startswith("synthetic: parsed anatomies equal the generator's on ")
               and line.split(" of ")[1].startswith(f"{n} studies") for line in out)


def test_needs_something_to_measure():
    proc = python("scripts/text_agreement.py", check=False)
    assert proc.returncode == 2 and "give --gold, --synthetic or --synthetic-n" in proc.stderr
