"""analysis/quality.py and judge.py: the Fréchet distance against closed forms, k-NN precision and recall on
point sets whose answer is known, the judge's cache, and the score ordering real cases on real Fashion-MNIST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaelab.analysis import judge as judge_module
from vaelab.analysis.judge import Judge, judge_features, judge_for, train_judge
from vaelab.analysis.quality import (
    check_temperatures,
    coverage,
    feature_distance,
    frechet_distance,
    knn_radii,
    precision_recall,
    quality_rows,
    scores,
)
from vaelab.data import ImageData
from vaelab.data import cache as decoded_cache
from vaelab.errors import ConfigError


def _rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


FRECHET_CASES = [  # (mean1, cov1, mean2, cov2, closed form)
    # equal Gaussians: 0
    ([1.0, 2.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([1.0, 4.0]), 0.0),
    # only the means differ: the squared distance between them
    ([0.0, 0.0], np.eye(2), [3.0, 4.0], np.eye(2), 25.0),
    # diagonal covariances commute: Σ_d (σ1_d − σ2_d)²
    ([0.0, 0.0], np.diag([1.0, 9.0]), [0.0, 0.0], np.diag([4.0, 1.0]), (1 - 2) ** 2 + (3 - 1) ** 2),
    # Σ1 = I, Σ2 = R diag(4, 9) Rᵀ: tr(Σ2^½) = 2 + 3, so 2 + 13 − 2·5, plus the mean shift 1² + 1²
    ([0.0, 0.0], np.eye(2), [1.0, 1.0], _rotation(0.7) @ np.diag([4.0, 9.0]) @ _rotation(0.7).T, 2 + 13 - 10 + 2),
    # one-dimensional: (μ1 − μ2)² + (σ1 − σ2)²
    ([0.5], np.array([[0.25]]), [-0.5], np.array([[4.0]]), 1.0 + (0.5 - 2.0) ** 2),
]


@pytest.mark.parametrize(("m1", "c1", "m2", "c2", "expected"), FRECHET_CASES)
def test_frechet_distance_matches_the_closed_form(m1, c1, m2, c2, expected):
    assert frechet_distance(np.array(m1), c1, np.array(m2), c2) == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(np.array(m2), c2, np.array(m1), c1) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_non_commuting_covariances_is_the_wasserstein_distance():
    """For 2x2 covariances, tr((Σ1^½ Σ2 Σ1^½)^½) = sqrt(tr(Σ1Σ2) + 2 sqrt(det(Σ1Σ2))) (a 2x2 PSD matrix M
    has tr(M^½) = sqrt(tr M + 2 sqrt(det M)))."""
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    cross = math.sqrt(np.trace(c1 @ c2) + 2 * math.sqrt(np.linalg.det(c1 @ c2)))
    expected = np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance(np.zeros(2), c1, np.zeros(2), c2) == pytest.approx(expected, rel=1e-10)


def test_feature_distance_of_samples_approaches_the_distance_of_their_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(200_000, 3))
    b = rng.normal(1.0, 2.0, size=(200_000, 3))
    assert feature_distance(a, b) == pytest.approx(3 * 1.0 + 3 * (2 - 1) ** 2, rel=0.01)
    assert feature_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def _line(n: int, start: float = 0.0) -> np.ndarray:
    """n points 1 apart on a line in 2-D."""
    return np.stack([start + np.arange(n, dtype=np.float64), np.zeros(n)], axis=1)


def test_knn_radii_on_a_line():
    # the 3rd nearest other point of an inner point is 2 away; of the first point, 3 away
    r = knn_radii(_line(10), k=3)
    assert r.tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="more than k=3"):
        knn_radii(_line(3), k=3)


def test_precision_and_recall_on_constructed_sets():
    real = _line(100)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, _line(100, start=1000.0)) == (0.0, 0.0)  # far away: inside neither manifold
    # half the real points: all inside the real manifold; the real points reach 3 past the fake ones' last point
    # (the k=3 radius of the fake set's end points), 0..52 of 0..99
    precision, recall = precision_recall(real, _line(50))
    assert (precision, recall) == (1.0, 53 / 100)
    # one real outlier far off widens the real manifold for nothing near it: precision of points beside it is 0
    assert coverage(np.array([[50.0, 30.0]]), real, knn_radii(real, 3)) == 0.0


def test_scores_and_rows():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 4)), rng.normal(0.5, 1.0, size=(300, 4))
    s = scores(real, fake)
    assert set(s) == {"fd", "precision", "recall"}
    assert s["fd"] == pytest.approx(feature_distance(real, fake))
    assert quality_rows({}) == []  # not computed
    assert quality_rows({"sample_quality": None}) == [("sample quality", "n/a (needs more than k = 3 test images)")]
    sq = {name: s for name in ("data", "reconstructions", "prior", "aggregate")}
    sq.update(n_images=300, k=3, judge="autoencoder", aggregate_components=5)
    rows = quality_rows({"sample_quality": sq})
    assert "not Inception FID" in rows[0][1]
    assert [r[0].strip() for r in rows[1:]] == ["training images (floor)", "reconstructions", "prior samples",
                                                "aggregate samples (K = 5)"]


def test_temperature_rows_follow_the_prior_row():
    s = {"fd": 2.0, "precision": 0.5, "recall": 0.25}
    sq = {name: s for name in ("data", "reconstructions", "prior", "aggregate")}
    sq.update(n_images=300, k=3, judge="autoencoder", aggregate_components=5,
              prior_temperature={"0.8": {"fd": 1.5, "precision": 0.6, "recall": 0.2}})
    rows = quality_rows({"sample_quality": sq})
    assert rows[-1] == ("  prior samples, T = 0.8", "1.500 / 60.0% / 20.0%")


@pytest.mark.parametrize(("given", "expected"), [("1,0.8,0.6", (1.0, 0.8, 0.6)), ("0.5, 1 ,0.5", (0.5, 1.0)),
                                                 ([1, 0.7], (1.0, 0.7))])
def test_temperatures_parse_from_text_or_numbers(given, expected):
    assert check_temperatures(given) == expected


@pytest.mark.parametrize("bad", ["0", "1,-0.5", "1,,0.8", "warm", "nan", [True], []])
def test_bad_temperatures_name_the_value(bad):
    with pytest.raises(ConfigError, match="--temperatures must"):
        check_temperatures(bad)


def _toy_data(labels: bool) -> ImageData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(120, 3, 40, 36), dtype=np.uint8)
    y = rng.integers(0, 3, size=120) if labels else None
    return ImageData("toy", x[:100], x[100:], y[:100] if labels else None, y[100:] if labels else None)


@pytest.mark.parametrize("labels", [True, False], ids=["classifier", "autoencoder"])
def test_the_judge_is_deterministic_cached_and_listed(labels, monkeypatch, tmp_path):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(judge_module, "JUDGE_STEPS", 5)
    data = _toy_data(labels)
    identity = {"dataset": "toy", "image_size": None}
    first = judge_for(data, identity)
    assert first.kind == ("classifier (3 classes)" if labels else "autoencoder")
    assert first.size == (32, 32)  # 40 x 36 images are averaged down for the judge
    again = train_judge(data.train, data.train_labels, steps=5)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    listed = decoded_cache.listing()
    assert "sample-quality judge" in listed
    trained = []

    def counted(images, labels, **_):
        trained.append(len(images))
        return Judge(data.shape, 3 if labels is not None else None)

    monkeypatch.setattr(judge_module, "train_judge", counted)
    cached = judge_for(data, identity)  # from the cache: no training
    assert trained == []
    f1, f2 = judge_features(first, data.test), judge_features(cached, data.test)
    assert f1.shape == (20, judge_module.FEATURES)
    np.testing.assert_array_equal(f1, f2)
    judge_for(data, {**identity, "image_size": "16"})  # another identity: another judge
    assert trained == [100]
    monkeypatch.setattr(judge_module, "JUDGE_STEPS", 6)
    judge_for(data, identity)  # other settings (a newer vaelab): trained again, replacing the old entry
    assert trained == [100, 100]
    assert sum(e.name.startswith("judge-toy-") for e in decoded_cache.entries()) == 2


def test_the_judge_takes_any_image_shape():
    for shape in [(1, 7, 9), (3, 28, 28), (3, 64, 64)]:
        j = Judge(shape, None)
        x = torch.rand(2, *shape)
        assert j.features(x).shape == (2, judge_module.FEATURES)
        assert torch.isfinite(j.loss(x, None))


@pytest.mark.slow
def test_the_score_orders_real_cases_on_fashion_mnist(fashion):
    """Held-out test images beat noisy test images, which beat images with their pixels shuffled, on the
    Fréchet distance and on recall; precision is highest for the held-out images. (Precision does not order
    noisy and shuffled images: the shuffled ones all land on one spot of feature space, and whether a real
    image's k-NN ball covers it is luck; measured 0.62 noisy, 0.65 shuffled.) Real images of one class keep
    their precision and lose recall, as a generator that drops modes does."""
    judge = judge_for(fashion, {"dataset": "fashion-mnist", "image_size": None, "center_crop": None,
                                "background": "white"})
    x = torch.from_numpy(np.asarray(fashion.test[:4000])).float() / 255  # (N, 1, 28, 28)
    real, other = x[:2000], x[2000:]
    gen = torch.Generator().manual_seed(0)
    noisy = (other + 0.3 * torch.randn(other.shape, generator=gen)).clamp(0, 1)
    perm = torch.stack([torch.randperm(28 * 28, generator=gen) for _ in range(len(other))])
    shuffled = other.flatten(1).gather(1, perm).view_as(other)
    one_class = x[torch.from_numpy(fashion.test_labels[:4000] == 0)]
    f_real = judge_features(judge, real)
    s = {name: scores(f_real, judge_features(judge, imgs)) for name, imgs in
         (("test", other), ("noisy", noisy), ("shuffled", shuffled), ("one class", one_class))}
    assert s["test"]["fd"] < s["noisy"]["fd"] < s["shuffled"]["fd"]
    assert s["test"]["fd"] < 0.1 * s["noisy"]["fd"]
    assert s["test"]["precision"] > 0.85
    assert s["test"]["precision"] > max(s["noisy"]["precision"], s["shuffled"]["precision"]) + 0.1
    assert s["test"]["recall"] > 0.85
    assert s["test"]["recall"] > s["noisy"]["recall"] + 0.3 > s["shuffled"]["recall"] + 0.3
    assert s["shuffled"]["recall"] < 0.05
    assert s["one class"]["precision"] > 0.85  # real T-shirts, inside the data's manifold ...
    assert s["one class"]["recall"] < 0.7  # ... but covering only part of it
