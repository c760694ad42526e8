"""Where a report places its findings: parts, clauses, implied sites, sides, specificity."""
import pytest

from vocab.anatomy_graph import AnatomyGraph
from vocab.finding_sites import finding_anatomies

GRAPH = AnatomyGraph.default()


@pytest.mark.parametrize("text, nodes", [
    # only sentences / clauses that state a finding
    ("Small effusion at the right costophrenic angle. The heart size is normal. The left lung is "
     "clear. Possible left lower lobe atelectasis.", ["right costophrenic angle", "left lower lung zone"]),
    ("The lungs are clear. No pneumothorax.", []),
    # implied sites: effusion -> costophrenic angle, pneumothorax -> apex, edema -> hila
    ("Small left pleural effusion.", ["left costophrenic angle"]),
    ("Right-sided pneumothorax.", ["right apical zone"]),
    ("There is mild pulmonary edema.", ["right hilar structures", "left hilar structures"]),
    ("Moderate cardiomegaly.", ["cardiac silhouette"]),
    # the side named far from the term, in another clause
    ("Right pleural effusion with blunting of the costophrenic angle.", ["right costophrenic angle"]),
    # a finding of its own comma part; a normal part next to it gives nothing
    ("Heart size within normal limits, mild aortic ectasia.", ["aortic arch"]),
    # the most specific node: not the whole right lung
    ("Poorly defined lung nodule in the right upper lobe.", ["right upper lung zone"]),
    # findings outside the 14 observations
    ("Degenerative changes of the thoracic spine.", ["spine"]),
    ("Calcified granuloma in the left midlung.", ["left mid lung zone"]),
    ("The lungs are hyperexpanded.", ["right lung", "left lung"]),
    ("Changes of emphysema.", ["lungs"]),
    ("Elevated left hemidiaphragm.", ["left hemidiaphragm"]),
    ("Left basilar opacity, likely atelectasis.", ["left lower lung zone"]),
    # a side only -> that lung; not for a device, nor beside a site outside the graph
    ("Pleural reaction on the right cannot be excluded.", ["right lung"]),
    ("A right-sided Mediport catheter is noted.", []),
    ("Healed right rib fractures.", []),
    ("Scattered calcified granulomas.", []),
    # device tips
    ("Left PICC line with tip in the upper SVC.", ["superior vena cava"]),
    ("Endotracheal tube with tip at the carina.", ["trachea", "carina"]),
    ("Low lung volumes with bibasilar atelectasis.", ["right lower lung zone", "left lower lung zone"]),
])
def test_finding_anatomies(text, nodes):
    assert finding_anatomies(text, GRAPH) == nodes


def test_nodes_outside_a_small_graph_are_ignored():
    small = AnatomyGraph({"chest": ("lungs", "heart"), "lungs": ("right lung", "left lung")})
    assert finding_anatomies("Left lower lobe opacity. Moderate cardiomegaly.", small) == [
        "left lung"
    ]
