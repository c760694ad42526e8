"""Entity thresholds chosen on validation: each observation's and leaf's maximises its F1 there."""

import torch
from torch import nn

from engine.calibrate import calibrate_entity_thresholds


class StandIn(nn.Module):
    """The entity head's probabilities are the image's first pixels: observation 0 and leaf 0 carry
    the signal, the rest is constant."""

    predicts_entities = True

    def __init__(self):
        super().__init__()
        self.obs_t, self.anat_t = torch.full((14,), 0.5), torch.full((25,), 0.5)

    def entity_probabilities(self, images):
        p = images[:, 0, 0, 0]
        return p[:, None].expand(-1, 14).clone(), p[:, None].expand(-1, 25).clone()

    def entity_thresholds(self):
        return self.obs_t, self.anat_t

    def set_entity_thresholds(self, obs, anat):
        self.obs_t, self.anat_t = obs, anat


def batches():
    probs = torch.tensor([0.9, 0.7, 0.35, 0.2, 0.1, 0.05])
    labels = torch.zeros(6, 14)
    labels[:3, 0] = 1  # positives at 0.9, 0.7, 0.35: the best threshold keeps all three
    anatomies = torch.zeros(6, 25, dtype=torch.bool)
    anatomies[:2, 0] = True  # positives at 0.9, 0.7: the best threshold cuts above 0.35
    images = probs[:, None, None, None].expand(-1, 3, 2, 2)
    return [{"image": images[:3], "labels": labels[:3], "anatomies": anatomies[:3], "index": torch.arange(3)},
            None,  # an unreadable batch is skipped
            {"image": images[3:], "labels": labels[3:], "anatomies": anatomies[3:], "index": torch.arange(3, 6)}]


def test_thresholds_maximise_f1_on_the_validation_split():
    model = StandIn()
    out = calibrate_entity_thresholds(model, batches(), "cpu")
    obs, anat = model.entity_thresholds()
    assert 0.2 <= obs[0] < 0.35 and 0.35 <= anat[0] < 0.7  # p > t: the lowest threshold of the best F1
    # a class without a positive keeps the previous mean threshold
    assert obs[1] == 0.5 and anat[1] == 0.5
    assert out["threshold_obs_mean"] == float(obs.mean())


def test_no_entity_head_nothing_to_calibrate():
    model = StandIn()
    model.predicts_entities = False
    assert calibrate_entity_thresholds(model, batches(), "cpu") == {}
