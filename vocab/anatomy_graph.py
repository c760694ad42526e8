"""The anatomy graph of SS-ACL as data: a tree of named regions.

Leaf names are encoded by the text encoder into anatomy queries; every inner
node's query is the mean of its children's, recursively. That restoration is a
fixed matrix (``averaging_matrix``), so no tree walk happens at run time.
"""
from __future__ import annotations

from functools import cached_property

import torch

_LUNG_PARTS = ("upper lung zone", "mid lung zone", "lower lung zone", "hilar structures",
               "apical zone", "costophrenic angle", "hemidiaphragm")

# name -> children, one entry per inner node. Leaves are the names that never appear as keys.
DEFAULT_TREE: dict[str, tuple[str, ...]] = {
    "chest": ("lungs", "mediastinum", "skeletal structures", "abdomen"),
    "lungs": ("right lung", "left lung"),
    "right lung": tuple(f"right {p}" for p in _LUNG_PARTS),
    "left lung": tuple(f"left {p}" for p in _LUNG_PARTS),
    "mediastinum": ("trachea", "upper mediastinum", "aortic arch", "superior vena cava",
                    "cardiac silhouette", "carina"),
    "cardiac silhouette": ("right atrium", "cavoatrial junction"),
    "skeletal structures": ("spine", "right clavicle", "left clavicle"),
}


class AnatomyGraph:
    """A rooted tree of anatomical regions. Nodes are indexed breadth-first from the root."""

    def __init__(self, tree: dict[str, tuple[str, ...]] = DEFAULT_TREE, root: str = "chest"):
        self.tree = {k: tuple(v) for k, v in tree.items()}
        self.root = root
        order, queue = [root], [root]
        self._parent: dict[str, str | None] = {root: None}
        while queue:
            node = queue.pop(0)
            for child in self.tree.get(node, ()):
                if child in self._parent:
                    raise ValueError(f"anatomy graph: node {child!r} has two parents")
                self._parent[child] = node
                order.append(child)
                queue.append(child)
        unknown = set(self.tree) - set(order)
        if unknown:
            raise ValueError(f"anatomy graph: nodes not reachable from {root!r}: {sorted(unknown)}")
        self.names: tuple[str, ...] = tuple(order)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.leaf_names: tuple[str, ...] = tuple(n for n in self.names if n not in self.tree)
        self.leaf_index = {n: i for i, n in enumerate(self.leaf_names)}
        self.inner_names: tuple[str, ...] = tuple(n for n in self.names if n in self.tree)

    @classmethod
    def default(cls) -> "AnatomyGraph":
        return cls(DEFAULT_TREE)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_leaves(self) -> int:
        return len(self.leaf_names)

    def parent(self, name: str) -> str | None:
        return self._parent[self._check(name)]

    def children(self, name: str) -> tuple[str, ...]:
        return self.tree.get(self._check(name), ())

    def is_leaf(self, name: str) -> bool:
        return self._check(name) not in self.tree

    def depth(self, name: str) -> int:
        d, node = 0, self._check(name)
        while self._parent[node] is not None:
            node, d = self._parent[node], d + 1
        return d

    def leaves_under(self, name: str) -> tuple[str, ...]:
        if self.is_leaf(name):
            return (name,)
        return tuple(leaf for c in self.children(name) for leaf in self.leaves_under(c))

    def leaf_mask(self, names) -> torch.Tensor:
        """Bool vector over leaves: True for every leaf under any of ``names``."""
        mask = torch.zeros(self.num_leaves, dtype=torch.bool)
        for n in names:
            for leaf in self.leaves_under(n):
                mask[self.leaf_index[leaf]] = True
        return mask

    @cached_property
    def averaging_matrix(self) -> torch.Tensor:
        """``[num_nodes, num_leaves]``: node queries = this @ leaf queries (children mean,
        recursively)."""
        rows: dict[str, torch.Tensor] = {}
        for name in reversed(self.names):  # children come after parents breadth-first
            if self.is_leaf(name):
                row = torch.zeros(self.num_leaves)
                row[self.leaf_index[name]] = 1.0
            else:
                row = torch.stack([rows[c] for c in self.tree[name]]).mean(0)
            rows[name] = row
        return torch.stack([rows[n] for n in self.names])

    @cached_property
    def child_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each inner node (in ``inner_names`` order): node indices of its children padded with
        0 to the widest node, and a bool mask of the real entries. Both ``[num_inner,
        max_children]``."""
        width = max(len(self.tree[n]) for n in self.inner_names)
        idx = torch.zeros(len(self.inner_names), width, dtype=torch.long)
        mask = torch.zeros(len(self.inner_names), width, dtype=torch.bool)
        for i, name in enumerate(self.inner_names):
            kids = [self.index[c] for c in self.tree[name]]
            idx[i, :len(kids)] = torch.tensor(kids)
            mask[i, :len(kids)] = True
        return idx, mask

    @property
    def inner_index(self) -> torch.Tensor:
        return torch.tensor([self.index[n] for n in self.inner_names], dtype=torch.long)

    @property
    def leaf_node_index(self) -> torch.Tensor:
        """Node index of every leaf, in ``leaf_names`` order: node outputs[:, this] = leaf
        outputs."""
        return torch.tensor([self.index[n] for n in self.leaf_names], dtype=torch.long)

    def restore(self, leaf_queries: torch.Tensor) -> torch.Tensor:
        """Node queries ``[..., num_nodes, D]`` from leaf queries ``[..., num_leaves, D]``: one
        matmul with ``averaging_matrix`` (every inner node = mean of its children, recursively)."""
        a = self.averaging_matrix.to(device=leaf_queries.device, dtype=leaf_queries.dtype)
        return a @ leaf_queries

    def _check(self, name: str) -> str:
        if name not in self.index:
            raise KeyError(f"anatomy graph has no node {name!r}")
        return name


def synthetic_graph(num_leaves: int, branching: int = 4) -> AnatomyGraph:
    """A balanced tree with ``num_leaves`` leaves, for scaling checks (benchmark)."""
    level = [f"leaf {i}" for i in range(num_leaves)]
    tree: dict[str, tuple[str, ...]] = {}
    depth = 0
    while len(level) > 1:
        depth += 1
        groups = [tuple(level[i:i + branching]) for i in range(0, len(level), branching)]
        level = [f"node {depth}.{j}" for j in range(len(groups))]
        tree.update(zip(level, groups))
    return AnatomyGraph(tree, root=level[0])


def graph_from_name(name: str) -> AnatomyGraph:
    """``cfg.model.graph``: "default" (the 32-node chest tree) or "synthetic_<num_leaves>"."""
    if name == "default":
        return AnatomyGraph.default()
    if name.startswith("synthetic_") and name[len("synthetic_"):].isdigit():
        return synthetic_graph(int(name[len("synthetic_"):]))
    raise ValueError(
        f"model.graph: unknown anatomy graph {name!r} (default | synthetic_<num_leaves>)"
    )


def graph_for_leaves(leaf_names) -> AnatomyGraph:
    """The default chest graph for its own leaves; a flat graph (leaf order kept) for any other."""
    graph = AnatomyGraph.default()
    if leaf_names is None or tuple(leaf_names) == graph.leaf_names:
        return graph
    return AnatomyGraph({"root": tuple(leaf_names)}, root="root")
