import json

import pytest

from datasets.annotation import (
    DataError,
    frontal_index,
    load_annotation,
    validate_record,
    view_rank,
    write_annotation,
)


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


def test_frontal_view_order_and_writing(tmp_path):
    assert frontal_index(["LATERAL", "AP", "PA"]) == 2           # PA first
    assert frontal_index(["LL", "ap"]) == 1                       # then AP
    assert frontal_index(["LATERAL", "", "LL"]) is None            # never a lateral
    assert sorted(["", "LATERAL", "AP", "PA"], key=view_rank) == ["PA", "AP", "LATERAL", ""]
    recs = [{"id": "a", "report": "x", "image_path": ["a.png"], "split": "val"},
            {"id": "b", "report": "y", "image_path": ["b.png"], "split": "train"}]
    out = tmp_path / "sub" / "annotation.json"
    assert write_annotation(out, recs) == {"train": 1, "val": 1, "test": 0}
    assert load_annotation(out, "val")[0]["id"] == "a" and load_annotation(out, "test") == []
    with pytest.raises(DataError, match=r"annotation.json: records with a split outside"):
        write_annotation(out, [dict(recs[0], split="validate")])
    bad = dict(recs[0], views=["PA", "LATERAL"])
    assert "field 'views' must be a list of 1 view names" in validate_record(bad, out, 0)
    assert validate_record(dict(recs[0], views=["PA"]), out, 0) is None
