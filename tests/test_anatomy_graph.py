import pytest
import torch

from vocab.anatomy_graph import AnatomyGraph, graph_from_name, synthetic_graph

LUNG = ("upper lung zone", "mid lung zone", "lower lung zone", "hilar structures", "apical zone",
        "costophrenic angle", "hemidiaphragm")


@pytest.fixture(scope="module")
def g():
    return AnatomyGraph.default()


def test_counts_and_levels(g):
    assert len(g) == 32 and g.num_leaves == 25 and len(g.inner_names) == 7
    assert {g.depth(n) for n in g.names} == {0, 1, 2, 3}  # four levels
    assert g.depth("chest") == 0 and g.depth("right lung") == 2 and g.depth("left apical zone") == 3
    assert g.depth("right atrium") == 3 and g.depth("spine") == 2 and g.depth("abdomen") == 1
    assert len(set(g.names)) == 32 and g.names[0] == "chest"


def test_tree(g):
    assert g.children("chest") == ("lungs", "mediastinum", "skeletal structures", "abdomen")
    assert g.children("lungs") == ("right lung", "left lung")
    assert g.children("right lung") == tuple(f"right {p}" for p in LUNG)
    assert g.children("left lung") == tuple(f"left {p}" for p in LUNG)
    assert g.children("mediastinum") == (
        "trachea",
        "upper mediastinum",
        "aortic arch",
        "superior vena cava",
        "cardiac silhouette",
        "carina",
    )
    assert g.children("cardiac silhouette") == ("right atrium", "cavoatrial junction")
    assert g.children("skeletal structures") == ("spine", "right clavicle", "left clavicle")
    assert g.is_leaf("abdomen") and g.children("abdomen") == ()
    assert g.parent("chest") is None and g.parent("right atrium") == "cardiac silhouette"
    assert g.parent("left hemidiaphragm") == "left lung"
    assert set(g.inner_names) == {"chest", "lungs", "right lung", "left lung", "mediastinum",
                                  "cardiac silhouette", "skeletal structures"}
    assert set(g.leaf_names) == set(g.names) - set(g.inner_names)
    assert g.leaves_under("lungs") == tuple(f"right {p}" for p in LUNG) + tuple(
        f"left {p}" for p in LUNG
    )
    assert set(g.leaves_under("mediastinum")) == {
        "trachea",
        "upper mediastinum",
        "aortic arch",
        "superior vena cava",
        "right atrium",
        "cavoatrial junction",
        "carina",
    }
    assert set(g.leaves_under("chest")) == set(g.leaf_names)
    with pytest.raises(KeyError):
        g.children("liver")


def test_leaf_mask_and_indices(g):
    m = g.leaf_mask(["cardiac silhouette", "abdomen"])
    assert m.sum() == 3 and m[g.leaf_index["right atrium"]] and m[g.leaf_index["abdomen"]]
    assert [g.names[i] for i in g.leaf_node_index] == list(g.leaf_names)
    assert [g.names[i] for i in g.inner_index] == list(g.inner_names)


def test_averaging_matrix_restores_children_means(g):
    a = g.averaging_matrix
    assert a.shape == (32, 25)
    torch.testing.assert_close(a.sum(1), torch.ones(32))  # rows are averages
    leaves = torch.randn(25, 6, dtype=torch.float64)
    nodes = g.restore(leaves)
    for name in g.names:  # leaves copied, every inner query the mean of its children's
        i = g.index[name]
        if g.is_leaf(name):
            torch.testing.assert_close(nodes[i], leaves[g.leaf_index[name]])
        else:
            kids = torch.stack([nodes[g.index[c]] for c in g.children(name)])
            torch.testing.assert_close(nodes[i], kids.mean(0))
    # recursive, not a flat leaf mean: chest = mean of its 4 children, abdomen (a leaf) weighs 1/4
    assert a[g.index["chest"], g.leaf_index["abdomen"]] == pytest.approx(0.25)
    batched = g.restore(leaves[None].expand(3, -1, -1))  # [B, 25, D] works too
    torch.testing.assert_close(batched[1], nodes)


def test_child_table(g):
    idx, mask = g.child_table
    assert idx.shape == mask.shape == (7, 7)  # 7 inner nodes, widest has 7 children
    for r, name in enumerate(g.inner_names):
        kids = [g.names[i] for i, on in zip(idx[r].tolist(), mask[r].tolist()) if on]
        assert tuple(kids) == g.children(name)
    assert mask.sum() == 31  # every node but the root is someone's child


def test_graph_from_name_and_synthetic():
    assert len(graph_from_name("default")) == 32
    s = graph_from_name("synthetic_64")
    assert s.num_leaves == 64 and len(s.inner_names) == 16 + 4 + 1
    assert synthetic_graph(5).num_leaves == 5 and s.names[0] == "node 3.0"
    with pytest.raises(ValueError):
        graph_from_name("nonsense")
