"""The rule-based CheXpert labeler reads the synthetic reports as the generator meant them."""
import numpy as np
import pytest

from datasets.synthetic import render_study
from datasets.synthetic_reports import FINDINGS, finding_templates, make_report
from vocab.labeler import RuleLabeler
from vocab.observations import CHEXPERT_OBSERVATIONS, OBSERVATION_INDEX


class FixedChoice:
    """A stand-in rng for make_report: always template k, no shuffling."""

    def __init__(self, k):
        self.k = k

    def random(self):
        return 0.0 if self.k == 0 else 0.99

    def integers(self, n):
        return min(self.k - 1, n - 1)

    def shuffle(self, x):
        pass


def events_of(t):
    out = []
    for leaf in FINDINGS[t][1]:
        for entry in (("right", "left") if t == "support_device" else ("right",)):
            out.append({"type": t, "leaf": leaf, "entry": entry})
    return out


def positives(labels):
    return {CHEXPERT_OBSERVATIONS[j] for j, v in enumerate(labels) if v == 1}


@pytest.mark.parametrize("t", sorted(FINDINGS))
def test_every_template_of_every_finding(t):
    texts, want = [], []
    for ev in events_of(t):
        for k in range(max(len(finding_templates(ev)), 2) + 1):
            for other in ([], [{"type": "effusion", "leaf": "left costophrenic angle"}]):
                if t == "effusion" and other:
                    continue
                text, labels, sentences = make_report([ev] + other, FixedChoice(k))
                assert sentences[0] in text  # the finding's own sentence, as written
                texts.append(text)
                want.append(labels)
    got = RuleLabeler().label(texts)
    for text, w, g in zip(texts, want, got):
        assert positives(g) == positives(w), text
        # what the generator negates is read as negative
        for j, v in enumerate(w):
            if v == 0:
                assert g[j] == 0, (CHEXPERT_OBSERVATIONS[j], text)


def test_normal_and_random_studies():
    studies = [render_study(i, 16, seed=4) for i in range(300)]
    got = RuleLabeler().label([s["report"] for s in studies])
    for s, g in zip(studies, got):
        assert positives(g) == positives(s["labels"]), s["report"]
    normal = [g for s, g in zip(studies, got) if not s["findings"]]
    assert normal and all(g[OBSERVATION_INDEX["No Finding"]] == 1 for g in normal)
    assert all(
        np.isnan(g[OBSERVATION_INDEX["Fracture"]]) or g[OBSERVATION_INDEX["Fracture"]] != 1
        for g in normal
    )
