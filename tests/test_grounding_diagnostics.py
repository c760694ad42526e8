"""scripts/grounding_diagnostics.py: the share of a token's variance between images, and the
measurements of a model's anatomy queries."""

import pytest
import torch

from scripts.grounding_diagnostics import between_image_share, diagnose
from tests.test_ssacl import batch, build, make_batch, tokenizers  # noqa: F401


def test_between_image_share():
    same = torch.ones(5, 2, 3)  # every image gives the same token: nothing comes from the image
    varying = torch.randn(400, 2, 3)  # zero-mean tokens that change with the image
    assert between_image_share(same).tolist() == [0.0, 0.0]
    assert (between_image_share(varying) > 0.95).all()


def test_diagnose_reports_every_leaf_and_the_trivial_aca_solution(tokenizers):  # noqa: F811
    model = build(tokenizers)
    b = make_batch(n=4)
    result = diagnose(model, [b, None], "cpu")
    assert len(result["leaves"]) == 25 and 0 < result["mean_entropy"] <= 1
    assert set(result["left_right_overlap"]) == {"upper lung zone", "mid lung zone", "lower lung zone",
                                                 "hilar structures", "apical zone", "costophrenic angle",
                                                 "hemidiaphragm", "clavicle"}
    assert result["tpar"] == pytest.approx(1 / 0.03) and result["aca_loss_real"] > 0
    assert 0 <= result["region_target_image_share"] <= 1
