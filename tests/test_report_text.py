
import pytest

from vocab.anatomy_graph import AnatomyGraph
from vocab.report_text import (
    ReportTextError,
    anatomy_mentions,
    clean_report,
    derive_anatomies,
    sentence_anatomies,
    split_sentences,
    usable_report,
)

GRAPH = AnatomyGraph.default()


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("The heart is normal.  No effusion!", "the heart is normal . no effusion ."),
        (
            "FINDINGS: 1. Lungs are clear.\n2. No pneumothorax.",
            "findings lungs are clear . no pneumothorax .",
        ),
        (
            "PA and lateral ___ views; ___ heart (mildly) enlarged...",
            "pa and lateral views . heart mildly enlarged .",
        ),
        (
            "Nodule measures 1.5 cm, see above and/or post-operative - change.",
            "nodule measures 1.5 cm see above and or post-operative change .",
        ),
        ("  ... \n ", ""),
        (
            "1) NG tube in the stomach. 2) Lines and tubes unchanged",
            "ng tube in the stomach . lines and tubes unchanged .",
        ),
        # NFKC and accent folding: ligatures, accents, full-width forms, unsplittable letters
        ("Épanchement négatif. ﬁndings: ﬂuid", "epanchement negatif . findings fluid ."),
        ("ＰＡ view; Straße, Øresund, 5 cm²", "pa view . strasse oresund 5 cm2 ."),
    ],
)
def test_clean_report(raw, clean):
    assert clean_report(raw) == clean
    assert clean_report(clean) == clean  # idempotent


def test_usable_report_names_why_a_report_cannot_be_used():
    assert usable_report("Cœur normal.") == "coeur normal ."
    for text, kind, says in [("  ... \n", "empty_report", "is empty"),
                             ("心脏大小正常。肺部清晰。", "non_latin_report", "no Latin letters"),
                             ("Сердце в норме.", "non_latin_report", "no Latin letters")]:
        with pytest.raises(ReportTextError, match=says) as e:
            usable_report(text)
        assert e.value.kind == kind


@pytest.mark.parametrize(
    "text, names",
    [
        ("There is a right lower lobe opacity.", ["right lower lung zone"]),
        ("Opacity in the right lower lung zone", ["right lower lung zone"]),
        ("Bibasilar atelectasis.", ["right lower lung zone", "left lower lung zone"]),
        ("Left base and right apex.", ["left lower lung zone", "right apical zone"]),
        ("Blunting of the left costophrenic angle.", ["left costophrenic angle"]),
        ("Clavicles are intact.", ["right clavicle", "left clavicle"]),
        (
            "Elevated right hemidiaphragm. Right hilum is prominent.",
            ["right hemidiaphragm", "right hilar structures"],
        ),
        ("The heart size is normal.", ["cardiac silhouette"]),
        (
            "Catheter tip at the cavoatrial junction. SVC. The aortic knob is calcified.",
            ["cavoatrial junction", "superior vena cava", "aortic arch"],
        ),
        (
            "Widened mediastinum. Trachea midline, carina normal.",
            ["upper mediastinum", "trachea", "carina"],
        ),
        ("Degenerative changes of the spine. Free air in the abdomen.", ["spine", "abdomen"]),
        ("No acute osseous abnormality.", []),
    ],
)
def test_derive_anatomies(text, names):
    assert derive_anatomies(text, GRAPH) == names


def test_sentences_and_their_anatomies():
    report = (
        "Small effusion at the left costophrenic angle. The heart is enlarged; no pneumothorax. "
        "Right upper lobe opacity."
    )
    assert split_sentences(report) == [
        "Small effusion at the left costophrenic angle",
        "The heart is enlarged",
        "no pneumothorax",
        "Right upper lobe opacity",
    ]
    pairs = sentence_anatomies(report, GRAPH)
    assert [p[1] for p in pairs] == [
        ["left costophrenic angle"],
        ["right atrium", "cavoatrial junction"],
        [],
        ["right upper lung zone"],
    ]
    cleaned = sentence_anatomies("the lungs are clear . bibasilar atelectasis .", GRAPH)
    assert cleaned[0][0] == "the lungs are clear"
    assert len(cleaned[0][1]) == 14  # both lungs -> all 14 lung leaves
    assert cleaned[1][1] == ["right lower lung zone", "left lower lung zone"]


@pytest.mark.parametrize("text, names", [
    # the vocabulary radiologists write
    ("Retrocardiac opacity.", ["left lower lung zone"]),
    ("Right perihilar haze.", ["right hilar structures"]),
    ("Blunting of the left costophrenic XXXX.", ["left costophrenic angle"]),
    ("Right paratracheal density.", ["upper mediastinum"]),
    ("The mediastinum is widened.", ["upper mediastinum"]),
    ("Clips in the right upper quadrant.", ["abdomen"]),
    ("Free air under the right hemidiaphragm.", ["abdomen"]),
    ("Dextroscoliosis and thoracic kyphosis.", ["spine"]),
    ("Calcified left midlung granuloma.", ["left mid lung zone"]),
    ("Tortuous thoracic aorta.", ["aortic arch"]),
    ("Low lung volumes.", []),
    # the side, far before the term, after it, or both
    ("Right pleural effusion with blunting of the costophrenic angle.",
     ["right costophrenic angle"]),
    ("Pneumothorax at the apex on the left.", ["left apical zone"]),
    ("Left greater than right basilar opacity.", ["right lower lung zone", "left lower lung zone"]),
    ("Opacity at the apex bilaterally.", ["right apical zone", "left apical zone"]),
])
def test_anatomy_vocabulary_and_sides(text, names):
    assert derive_anatomies(text, GRAPH) == names


def test_anatomy_mentions_take_the_side_from_the_sentence():
    sentence = "right pleural effusion with blunting of the costophrenic angle"
    part = "blunting of the costophrenic angle"
    assert anatomy_mentions(part, GRAPH) == [(16, "right costophrenic angle"),
                                             (16, "left costophrenic angle")]
    assert anatomy_mentions(part, GRAPH, context=sentence) == [(16, "right costophrenic angle")]
