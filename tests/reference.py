"""Independent float64 references: plain bisection and the textbook loss formula."""
import numpy as np


def softargmax(theta, alpha, log_q=None, iterations=200):
    """p_j = q_j [1 + (alpha-1)(theta_j - tau)]_+^(1/(alpha-1)) by bisection on tau, row by row."""
    theta = np.asarray(theta, dtype=np.float64)
    q = np.ones_like(theta) if log_q is None else np.exp(np.broadcast_to(log_q, theta.shape).astype(np.float64))
    if alpha == 1.0:
        z = theta + np.log(q)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    out = np.empty_like(theta)
    for i, (row, qi) in enumerate(zip(theta, q)):
        finite = np.isfinite(row)

        def mass(tau):
            z = np.clip(1.0 + (alpha - 1.0) * (row[finite] - tau), 0.0, None)
            return np.sum(qi[finite] * z ** (1.0 / (alpha - 1.0)))

        lo = np.max(row[finite]) - 1e6
        hi = np.max(row[finite]) + 1e6
        while mass(lo) < 1.0:
            lo -= 1e6
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mass(mid) >= 1.0 else (lo, mid)
        z = np.zeros_like(row)
        z[finite] = np.clip(1.0 + (alpha - 1.0) * (row[finite] - lo), 0.0, None)
        p = qi * z ** (1.0 / (alpha - 1.0))
        out[i] = p / p.sum()
    return out


def loss(theta, targets, alpha, log_q=None):
    """<p - e_y, theta> + (q_y^(1-alpha) - sum_j q_j^(1-alpha) p_j^alpha) / (alpha (alpha - 1))."""
    theta = np.asarray(theta, dtype=np.float64)
    p = softargmax(theta, alpha, log_q)
    log_q = np.zeros_like(theta) if log_q is None else np.broadcast_to(log_q, theta.shape).astype(np.float64)
    rows = np.arange(theta.shape[0])
    if alpha == 1.0:
        z = theta + log_q
        m = z.max(axis=1)
        return m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[rows, targets]
    q = np.exp(log_q)
    inner = np.where(p > 0, p * theta, 0.0).sum(axis=1) - theta[rows, targets]
    reg = (q[rows, targets] ** (1 - alpha) - (q ** (1 - alpha) * p ** alpha).sum(axis=1)) / (alpha * (alpha - 1))
    return inner + reg
