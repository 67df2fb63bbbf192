"""The shared inference helpers: probabilities with the flip TTA, the label a row gets (threshold or argmax) and its
top-k, the same whether the probabilities are torch tensors (`classify dir`, `serve`) or numpy arrays (`eval`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from classify.classifier import Classifier
from classify.inference import class_probabilities, decide, predict_loader, predict_rows, ranked, top_k
from curator.core.runtime import Runtime
from curator.embedding.backbones import load_backbone

CPU = Runtime("cpu", "float32", "test")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Classifier(load_backbone("efficientnet_lite0", pretrained=False), 4).eval()


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8))


def test_probabilities_average_the_flipped_batch_with_tta(classifier):
    pixels = _pixels()
    plain, feats = class_probabilities(classifier, pixels, CPU, tta=False)
    with torch.inference_mode():
        flipped = torch.softmax(classifier(pixels.flip(3)), 1)
        direct = torch.softmax(classifier(pixels), 1)
    assert torch.allclose(plain, direct, atol=1e-6) and plain.dtype == torch.float32
    assert torch.allclose(plain.sum(1), torch.ones(3), atol=1e-5)
    assert feats.shape == (3, classifier.head.fc.in_features)
    both, _ = class_probabilities(classifier, pixels, CPU, tta=True)
    assert torch.allclose(both, (direct + flipped) / 2, atol=1e-6) and not torch.allclose(both, plain)


def test_a_loader_in_order_and_batches_by_position_give_the_same_rows(classifier):
    pixels = _pixels(5)
    in_order = [(pixels[:2], torch.tensor([0, 1])), (pixels[2:], torch.tensor([2, 3, 4]))]
    probs, feats = predict_loader(classifier, in_order, CPU, tta=False)
    shuffled = [(pixels[[4, 0]], torch.tensor([4, 0])), (pixels[[2]], torch.tensor([2]))]  # rows 1 and 3 failed
    by_row, present = predict_rows(classifier, shuffled, 5, CPU, tta=False)
    assert present.tolist() == [True, False, True, False, True]
    np.testing.assert_allclose(by_row[present], probs[present], atol=1e-6)
    assert (by_row[~present] == 0).all() and feats.shape[0] == 5


def test_the_label_follows_the_threshold_or_the_argmax_for_torch_and_numpy_alike():
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.55, 0.45]], dtype=np.float32)
    assert decide(probs, None).tolist() == [0, 1, 0]
    assert decide(probs, 0.4).tolist() == [0, 1, 1] and decide(probs, 0.4).dtype == np.int64
    assert decide(torch.from_numpy(probs), 0.4).tolist() == [0, 1, 1]
    top1, confidence, idx, scores = ranked(torch.from_numpy(probs), 2, threshold=0.4)
    assert top1.tolist() == [0, 1, 1] and top1.dtype == torch.int32
    assert confidence.tolist() == pytest.approx([0.7, 0.6, 0.45])  # the decided class's probability
    assert idx.tolist() == [[0, 1], [1, 0], [0, 1]] and scores[:, 0].tolist() == pytest.approx([0.7, 0.6, 0.55])


def test_top_k_names_the_most_probable_classes_first_ties_in_class_order():
    probs = np.array([[0.1, 0.4, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]])
    names, scores = top_k(probs, ["a", "b", "c", "d"], 3)
    assert names == [["b", "c", "a"], ["a", "b", "c"]] and scores[0] == pytest.approx([0.4, 0.4, 0.1])
    assert top_k(probs, ["a", "b", "c", "d"], 9)[0][0] == ["b", "c", "a", "d"]  # at most every class
