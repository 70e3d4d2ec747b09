"""Probes: small predictors of one target from codes, fitted on train rows and scored on held-out rows.

A linear probe (multinomial logistic regression for a discrete target, ridge regression for a continuous one,
on standardised codes) says whether a target can be read off the codes along straight lines, and its weights say
which dimensions carry it; a k-nearest-neighbour probe says whether it can be read off them at all.
"""

from __future__ import annotations

import numpy as np


def standardised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both scaled by the train rows' mean and std; a column constant on the train rows becomes 0."""
    mean, std = train.mean(0), train.std(0)
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    return (train - mean) * scale, (test - mean) * scale


def lbfgs(fun, theta: np.ndarray, max_iter: int, memory: int = 10, tol: float = 1e-9) -> np.ndarray:
    """Minimise a smooth convex fun(θ) -> (value, gradient) from θ by L-BFGS with a backtracking (Armijo) line
    search; stops when the gradient's largest entry is below tol or after max_iter steps."""
    value, grad = fun(theta)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.abs(grad).max() < tol:
            break
        q = grad.copy()  # two-loop recursion: q becomes H⁻¹ grad
        alphas = []
        for s_k, y_k in zip(reversed(s_hist), reversed(y_hist), strict=True):
            a = s_k @ q / (y_k @ s_k)
            alphas.append(a)
            q -= a * y_k
        q *= s_hist[-1] @ y_hist[-1] / (y_hist[-1] @ y_hist[-1]) if s_hist else 1.0 / max(1.0, np.abs(grad).max())
        for (s_k, y_k), a in zip(zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True):
            q += (a - y_k @ q / (y_k @ s_k)) * s_k
        step, slope = 1.0, -(grad @ q)
        while True:
            new_theta = theta - step * q
            new_value, new_grad = fun(new_theta)
            if new_value <= value + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        if new_value > value:  # no descent left at float64 precision
            break
        s_k, y_k = new_theta - theta, new_grad - grad
        if s_k @ y_k > 1e-12:
            s_hist, y_hist = [*s_hist[-memory + 1:], s_k], [*y_hist[-memory + 1:], y_k]
        theta, value, grad = new_theta, new_value, new_grad
    return theta


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float, max_iter: int) -> tuple[np.ndarray, ...]:
    """Multinomial logistic regression: weights (D, C) and biases (C,) minimising the mean cross-entropy plus
    l2/2 ‖W‖², by L-BFGS in float64 (deterministic)."""
    n, d = x.shape
    onehot = np.eye(classes)[y]  # (N, C)

    def fun(theta):
        w, b = theta[:d * classes].reshape(d, classes), theta[d * classes:]
        logits = x @ w + b
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # (N, C)
        err = (np.exp(log_p) - onehot) / n
        value = -(onehot * log_p).sum() / n + 0.5 * l2 * (w * w).sum()
        return value, np.concatenate([(x.T @ err + l2 * w).ravel(), err.sum(0)])

    theta = lbfgs(fun, np.zeros(d * classes + classes), max_iter)
    return theta[:d * classes].reshape(d, classes), theta[d * classes:]


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Least squares with penalty l2 ‖w‖² per row: w = (XᵀX/n + l2 I)⁻¹ Xᵀ(y − ȳ)/n on centred x."""
    mean = x.mean(0)
    xc = x - mean
    w = np.linalg.solve(xc.T @ xc / len(x) + l2 * np.eye(x.shape[1]), xc.T @ (y - y.mean()) / len(x))
    return w, float(y.mean() - mean @ w)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """1 − SSE / SST; a constant y scores 0."""
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / sst if sst > 0 else 0.0


def linear_probe(z_train, z_test, f_train, f_test, discrete: bool, l2: float,
                 max_iter: int) -> tuple[float, float, np.ndarray]:
    """(held-out score, chance, importance (L,)) of a target (N,) from standardised codes (N, L): accuracy of a
    logistic probe for a discrete target (chance: always saying the commonest train level), R² (at least 0) of
    a ridge probe for a continuous one (chance: 0). Importance: the absolute weights (mean over levels)."""
    if discrete:
        levels, y = np.unique(f_train, return_inverse=True)
        w, b = fit_logistic(z_train, y.reshape(-1), len(levels), l2, max_iter)
        pred = levels[np.argmax(z_test @ w + b, axis=1)]
        chance = float(np.mean(f_test == levels[np.argmax(np.bincount(y.reshape(-1)))]))
        importance = np.abs(w - w.mean(1, keepdims=True)).mean(1)
        return float(np.mean(pred == f_test)), chance, importance
    scale = f_train.std()
    coef, intercept = fit_ridge(z_train, f_train / scale, l2)
    return max(0.0, r2(f_test, (z_test @ coef + intercept) * scale)), 0.0, np.abs(coef)


def knn_probe(z_train, z_test, f_train, f_test, discrete: bool, k: int, max_rows: int, block: int = 1024) -> float:
    """Held-out accuracy (discrete target: the commonest level among the k nearest train codes) or R² (at least
    0; continuous: their mean) of a k-nearest-neighbour probe, Euclidean on standardised codes, from the first
    `max_rows` train rows."""
    z_train, f_train = z_train[:max_rows], f_train[:max_rows]
    levels, y = np.unique(f_train, return_inverse=True)
    y = y.reshape(-1)
    k = min(k, len(z_train))
    pred = np.empty(len(z_test))
    sq = (z_train**2).sum(1)
    for i in range(0, len(z_test), block):
        d = sq[None] - 2 * z_test[i:i + block] @ z_train.T  # (b, N) squared distances, up to a per-row constant
        nn = np.argpartition(d, k - 1, axis=1)[:, :k]  # (b, k)
        if discrete:
            counts = np.zeros((len(nn), len(levels)))
            np.add.at(counts, (np.arange(len(nn))[:, None], y[nn]), 1.0)
            pred[i:i + block] = levels[counts.argmax(1)]
        else:
            pred[i:i + block] = f_train[nn].mean(1)
    return float(np.mean(pred == f_test)) if discrete else max(0.0, r2(f_test, pred))
