"""kNN accuracy on cases with a known answer."""

import torch
import torch.nn.functional as F

from aelab.knn import encode_all, knn_accuracy, knn_predict


def test_nearest_neighbour_by_cosine_not_by_distance():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 2])
    # [10, 1] is far from [1, 0] in distance but at a tiny angle: cosine picks class 0
    queries = F.normalize(torch.tensor([[10.0, 1.0], [0.1, 5.0], [-3.0, -0.5]]), dim=1)
    assert knn_predict(bank, labels, queries, k=1, num_classes=3).tolist() == [0, 1, 2]


def test_vote_is_similarity_weighted():
    # two weak neighbours of class 1 lose to one very close neighbour of class 0
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = F.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    assert knn_predict(bank, labels, query, k=3, num_classes=2).tolist() == [0]


def test_separated_clusters_are_perfect_and_shuffled_labels_are_not():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(50)
    points = F.normalize(centres[labels] + 0.05 * torch.randn(200, 16, generator=g), dim=1)
    assert knn_accuracy(points[::2], labels[::2], points[1::2], labels[1::2], k=5,
                        num_classes=4) == 1.0
    shuffled = labels[::2][torch.randperm(100, generator=g)]
    assert knn_accuracy(points[::2], shuffled, points[1::2], labels[1::2], k=5,
                        num_classes=4) < 0.6


def test_encode_all_normalises_features():
    class Enc(torch.nn.Module):
        def encode(self, x):
            return x.flatten(1)[:, :3] * 10

    images = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8)
    feats = encode_all(Enc(), images, batch_size=2, device=torch.device("cpu"))
    assert feats.shape == (5, 3)
    assert torch.allclose(feats.norm(dim=1), torch.ones(5))
