"""The final layer: learns, is deterministic, keeps the codelab's knobs, refuses bad values."""

import numpy as np
import pytest

from retrain.config import FitConfig
from retrain.errors import ConfigError
from retrain import head as head_module
from retrain.fit_data import validate_config
from retrain.head import Head, _loss_grad, train_lbfgs, train_sgd


def _blobs(n=60, k=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = np.arange(n) % k
    X = centers[y] + rng.normal(0, 1, (n, d))
    return X.astype(np.float32), y


def test_lbfgs_learns_and_picks_l2_on_validation():
    X, y = _blobs(300)
    head, l2, hist, grid = train_lbfgs(X[:200], y[:200], X[200:], y[200:], 3)
    assert (head.probs(X[200:]).argmax(1) == y[200:]).mean() > 0.95
    assert l2 in [g["l2"] for g in grid] and len(grid) > 1
    assert hist[-1]["validation_accuracy"] > 0.95


def test_blocked_loss_gradient_matches_finite_differences(monkeypatch):
    monkeypatch.setattr(head_module, "LOSS_BLOCK_BYTES", 16 * 4 * 7)  # blocks of 7 rows: a ragged last block
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(50, 16)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    Y1, sw = np.eye(3)[y], np.full(50, 1 / 50)
    w = rng.normal(0, 0.1, 16 * 3 + 3)
    f, g = _loss_grad(w, Z, Y1, 0.1, sw)
    eps = 1e-4
    for j in rng.choice(len(w), 12, replace=False):
        d = np.zeros_like(w)
        d[j] = eps
        numeric = (_loss_grad(w + d, Z, Y1, 0.1, sw)[0] - _loss_grad(w - d, Z, Y1, 0.1, sw)[0]) / (2 * eps)
        assert abs(numeric - g[j]) < 1e-4 * max(1, abs(numeric))
    monkeypatch.setattr(head_module, "LOSS_BLOCK_BYTES", 1 << 30)  # one block: the same loss
    assert np.isclose(_loss_grad(w, Z, Y1, 0.1, sw)[0], f)


def test_lbfgs_is_deterministic():
    X, y = _blobs(120)
    a = train_lbfgs(X[:80], y[:80], X[80:], y[80:], 3)[0]
    b = train_lbfgs(X[:80], y[:80], X[80:], y[80:], 3)[0]
    assert np.array_equal(a.W, b.W)


def test_sgd_codelab_loop_logs_every_interval_and_is_seeded():
    X, y = _blobs(200)
    h1, hist = train_sgd(X[:150], y[:150], X[150:], y[150:], 3, learning_rate=0.1, steps=100,
                         batch_size=20, eval_every=10, seed=3, quiet=True)
    h2, _ = train_sgd(X[:150], y[:150], X[150:], y[150:], 3, learning_rate=0.1, steps=100,
                      batch_size=20, eval_every=10, seed=3, quiet=True)
    assert [h["step"] for h in hist] == list(range(10, 101, 10))
    assert np.array_equal(h1.W, h2.W)
    assert hist[-1]["validation_accuracy"] > 0.9


def test_folded_head_equals_standardised_head():
    X, y = _blobs(90)
    head = train_lbfgs(X[:60], y[:60], X[60:], y[60:], 3)[0]
    W, b = head.folded()
    assert np.allclose(X @ W + b, head.logits(X), atol=1e-3)


@pytest.mark.parametrize("change,msg", [
    ({"testing_percentage": 0}, "testing_percentage"),
    ({"validation_percentage": 120}, "validation_percentage"),
    ({"testing_percentage": 50, "validation_percentage": 45}, "at least 10%"),
    ({"learning_rate": -1.0}, "learning_rate must be positive"),
    ({"train_batch_size": 0}, "train_batch_size must be at least 1"),
    ({"how_many_training_steps": 0}, "how_many_training_steps"),
])
def test_bad_values_are_refused(change, msg):
    with pytest.raises(ConfigError, match=msg):
        validate_config(FitConfig(image_dir="x", **change))


def test_weighted_sum_of_heads_is_one_head_with_their_summed_logits():
    from retrain.head import weighted_sum

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 8)), np.arange(60) % 3
    a = train_lbfgs(X[:40], y[:40], X[40:], y[40:], 3)[0]
    b = Head(rng.normal(size=(8, 3)), rng.normal(size=3), rng.normal(size=8), rng.uniform(0.5, 2, size=8))
    s = weighted_sum([(0.3, a), (1.7, b)])
    np.testing.assert_allclose(s.logits(X), 0.3 * a.logits(X) + 1.7 * b.logits(X), rtol=1e-10, atol=1e-10)
    W, b0 = s.folded()  # and exports as any head does
    np.testing.assert_allclose(X @ W + b0, s.logits(X), rtol=1e-4, atol=1e-4)


def test_head_probabilities_sum_to_one():
    h = Head(np.eye(4, 3), np.zeros(3), np.zeros(4), np.ones(4))
    p = h.probs(np.random.default_rng(0).normal(size=(5, 4)))
    assert np.allclose(p.sum(1), 1)
