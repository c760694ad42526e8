import json

import pytest

from datasets.annotation import DataError, load_annotation, validate_record


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
    assert (
        validate_record({"id": "s1", "report": "x", "image_path": ["a.png"]}, "ann.json", 3) is None
    )
