"""scripts/linear_ceiling.py: a separable label reads 1.0, a label the features do not hold ~0.5."""
import numpy as np

from scripts.linear_ceiling import ceiling


def test_ceiling_reads_what_the_features_hold():
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, size=(n, 2)).astype(float)
        x = rng.normal(size=(n, 4))
        x[:, 0] += 4 * y[:, 0]  # label 0 is written in feature 0; label 1 nowhere
        return {"f": x}, y, ["seen", "unseen"]

    result = ceiling(split(400), split(400))["f"]
    assert result["per_label"]["seen"] > 0.99
    assert abs(result["per_label"]["unseen"] - 0.5) < 0.1
    assert result["macro"] == np.mean(list(result["per_label"].values()))
