import json

import pytest

from datasets.reports import DataError, clean_report, derive_anatomies, load_annotation, validate_record
from models.anatomy_graph import AnatomyGraph

GRAPH = AnatomyGraph.default()


@pytest.mark.parametrize("raw, clean", [
    ("The heart is normal.  No effusion!", "the heart is normal . no effusion ."),
    ("FINDINGS: 1. Lungs are clear.\n2. No pneumothorax.", "findings lungs are clear . no pneumothorax ."),
    ("PA and lateral ___ views; ___ heart (mildly) enlarged...", "pa and lateral views . heart mildly enlarged ."),
    ("Nodule measures 1.5 cm, see above and/or post-operative - change.",
     "nodule measures 1.5 cm see above and or post-operative change ."),
    ("  ... \n ", ""),
    ("1) NG tube in the stomach. 2) Lines and tubes unchanged", "ng tube in the stomach . lines and tubes unchanged ."),
])
def test_clean_report(raw, clean):
    assert clean_report(raw) == clean
    assert clean_report(clean) == clean  # idempotent


@pytest.mark.parametrize("text, names", [
    ("There is a right lower lobe opacity.", ["right lower lung zone"]),
    ("Opacity in the right lower lung zone", ["right lower lung zone"]),
    ("Bibasilar atelectasis.", ["right lower lung zone", "left lower lung zone"]),
    ("Left base and right apex.", ["left lower lung zone", "right apical zone"]),
    ("Blunting of the left costophrenic angle.", ["left costophrenic angle"]),
    ("Clavicles are intact.", ["right clavicle", "left clavicle"]),
    ("Elevated right hemidiaphragm. Right hilum is prominent.", ["right hemidiaphragm", "right hilar structures"]),
    ("The heart size is normal.", ["cardiac silhouette"]),
    ("Catheter tip at the cavoatrial junction. SVC. The aortic knob is calcified.",
     ["cavoatrial junction", "superior vena cava", "aortic arch"]),
    ("Widened mediastinum. Trachea midline, carina normal.", ["upper mediastinum", "trachea", "carina"]),
    ("Degenerative changes of the spine. Free air in the abdomen.", ["spine", "abdomen"]),
    ("No acute osseous abnormality.", []),
])
def test_derive_anatomies(text, names):
    assert derive_anatomies(text, GRAPH) == names


def test_load_annotation_errors(tmp_path):
    ann = tmp_path / "annotation.json"
    ann.write_text(json.dumps({"train": [{"id": "a", "report": "x", "image_path": ["a.png"]}]}))
    assert load_annotation(ann, "train")[0]["id"] == "a"
    with pytest.raises(DataError, match=r"annotation.json.*no split 'val'"):
        load_annotation(ann, "val")
    ann.write_text("{not json")
    with pytest.raises(DataError, match="annotation.json"):
        load_annotation(ann, "train")


@pytest.mark.parametrize("rec, field", [
    ({"report": "x", "image_path": ["a.png"]}, "'id'"),
    ({"id": "s1", "image_path": ["a.png"]}, "'report'"),
    ({"id": "s1", "report": "x", "image_path": []}, "'image_path'"),
    ({"id": "s1", "report": "x", "image_path": ["a.png"], "labels": [1, 0]}, "'labels'"),
    ({"id": "s1", "report": "x", "image_path": ["a.png"], "anatomies": "lungs"}, "'anatomies'"),
])
def test_validate_record_names_record_and_field(rec, field):
    msg = validate_record(rec, "ann.json", 3)
    assert msg and "ann.json" in msg and field in msg and "#3" in msg
    if "id" in rec:
        assert "'s1'" in msg
    assert validate_record({"id": "s1", "report": "x", "image_path": ["a.png"]}, "ann.json", 3) is None
