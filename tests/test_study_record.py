"""One prepared study as a record: labels given or from the rule labeler, anatomies from the
report parser, empty reports refused."""
from datasets.study_record import make_record, report_leaves
from vocab.anatomy_graph import AnatomyGraph
from vocab.observations import OBSERVATION_INDEX

GRAPH = AnatomyGraph.default()


def test_make_record():
    rec, why = make_record("s1", "Moderate cardiomegaly. No effusion.", ["a.jpg", "b.jpg"],
                           ["PA", "LATERAL"], "train", subject_id="10")
    assert why == "" and rec["views"] == ["PA", "LATERAL"] and rec["subject_id"] == "10"
    assert rec["labels"][OBSERVATION_INDEX["Cardiomegaly"]] == 1.0
    assert rec["labels"][OBSERVATION_INDEX["Pleural Effusion"]] == 0.0
    assert rec["labels"][OBSERVATION_INDEX["Edema"]] is None
    assert rec["anatomies"] == ["right atrium", "cavoatrial junction"]
    given = [None] * 14
    rec, _ = make_record("s2", "Clear lungs.", ["a.jpg"], ["AP"], "val", labels=given)
    assert rec["labels"] is given and rec["anatomies"] == []
    assert make_record("s3", " ... ", ["a.jpg"], ["PA"], "test") == (
        None, "empty report text in the chosen sections")
    assert make_record("s4", "Clear lungs.", [], [], "test") == (None, "no image")


def test_report_leaves_expand_nodes_in_graph_order():
    assert report_leaves("Bilateral pleural effusions.", GRAPH) == [
        "right costophrenic angle", "left costophrenic angle"]
    assert len(report_leaves("The lungs are hyperexpanded.", GRAPH)) == 14
