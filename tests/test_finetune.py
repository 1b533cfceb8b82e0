"""Where a fine-tuning run's prototypes start: the starting model's (by speaker name), or class means."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from spkver.finetune import FineTuningError, class_mean_prototypes, start_prototypes, zero_loss_lead
from spkver.losses import CosFace, QMargin
from spkver.models import CosineClassifier, StartingModel


class _Batch(SimpleNamespace):
    def to(self, device):
        return self


class _Extractor(torch.nn.Module):
    """Embeddings are the first two samples of the waveform: the class means are known in advance."""

    embedding_dim = 2

    def forward(self, waveforms, lengths):
        return waveforms[:, :2]


def _loader(vectors, labels, batch=3):
    for start in range(0, len(labels), batch):
        yield _Batch(sig=(torch.tensor(vectors[start:start + batch]), torch.ones(len(labels[start:start + batch]))),
                     speaker_index=SimpleNamespace(data=torch.tensor(labels[start:start + batch])[:, None]))


def test_the_starting_models_prototypes_are_matched_to_the_training_speakers_by_name_and_speed():
    classes = ["ann", "bob", "cid"]
    old = torch.arange(18.0).reshape(9, 2)  # 3 speakers x 3 speeds
    start = StartingModel(_Extractor(), "test", None, prototypes=old, classes=classes)
    speakers = {"cid": 0, "ann": 1}  # a subset, in another order, with speed perturbation
    classifier = CosineClassifier(2, 6)
    message = start_prototypes(start, _Extractor(), classifier, speakers)
    assert message == "the prototypes of its 2 speakers (matched by name)"
    assert torch.equal(classifier.weight.detach(), old[[2, 0, 5, 3, 8, 6]])


def test_other_speakers_start_at_the_normalised_class_means_under_the_starting_extractor():
    vectors = [[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 5.0], [4.0, 4.0], [2.0, 0.0]]
    labels = [0, 1, 2, 1, 2, 0]
    start = StartingModel(_Extractor(), "test", None, prototypes=torch.ones(5, 2), classes=["x", "y", "z", "u", "v"])
    classifier = CosineClassifier(2, 4)
    untouched = classifier.weight.detach()[3].clone()
    message = start_prototypes(start, _Extractor(), classifier, {"p": 0, "q": 1, "r": 2, "s": 3},
                               loader=list(_loader(vectors, labels)))
    assert "class-mean embeddings under the starting model (3 of 4 classes seen" in message
    expected = torch.stack([F.normalize(F.normalize(torch.tensor(vectors), dim=1)[torch.tensor(labels) == k].mean(0),
                                        dim=0) for k in range(3)])
    torch.testing.assert_close(classifier.weight.detach()[:3], expected)
    assert torch.equal(classifier.weight.detach()[3], untouched)  # never seen: keeps its random start
    means, covered = class_mean_prototypes(_Extractor(), list(_loader(vectors, labels)), 3, max_examples=3)
    assert covered == 3 and torch.allclose(means[0], torch.tensor([1.0, 0.0]))


def test_unnamed_prototypes_load_row_for_row_only_when_asked_and_shaped_alike():
    start = StartingModel(_Extractor(), "WeSpeaker folder", "ws", prototypes=torch.randn(6, 2))
    classifier = CosineClassifier(2, 6)
    assert start_prototypes(start, _Extractor(), classifier, {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5},
                            "starting_model").startswith("its prototypes row for row")
    assert torch.equal(classifier.weight.detach(), start.prototypes)
    with pytest.raises(FineTuningError, match=r"starting_model: ws holds prototypes \(6, 2\); this experiment has "
                                              r"\(4, 2\)"):
        start_prototypes(start, _Extractor(), CosineClassifier(2, 4), {"a": 0, "b": 1, "c": 2, "d": 3},
                         "starting_model")


def test_the_zero_loss_lead_says_when_q_margin_can_never_reach_zero_loss():
    assert zero_loss_lead(CosFace(32.0, 0.2)) is None
    lead, message = zero_loss_lead(QMargin(10.0, 0.1, 1.5))
    assert lead == pytest.approx(0.33, abs=0.005) and message.endswith("reachable")
    lead, message = zero_loss_lead(QMargin(10.0, 0.5, 1.5))
    assert lead == pytest.approx(2.44, abs=0.005) and "beyond any embedding" in message
