r"""The alpha-divergence f-softargmax and its Fenchel--Young loss.

This module knows nothing of speakers: it maps rows of logits to sparse
probability vectors and scores them against integer targets.

Notation (one row): logits :math:`\theta \in \mathbb{R}^C`, target :math:`y`,
reference measure :math:`q \in (0, \infty)^C` given as ``log_q``, and
:math:`\alpha \ge 1`, :math:`k = 1/(\alpha - 1)`.

* :math:`\exp_\alpha(v) = [1 + (\alpha-1) v]_+^{k}` and
  :math:`\log_\alpha(u) = (u^{\alpha-1} - 1)/(\alpha-1)`; both tend to exp and
  log as :math:`\alpha \to 1`.
* f-softargmax (Roulet et al., 2025):
  :math:`p_j = q_j \exp_\alpha(\theta_j - \tau)` with :math:`\tau` the root of
  :math:`\sum_j p_j = 1`.  For :math:`\alpha > 1` the posterior is sparse:
  :math:`p_j = 0` exactly when :math:`\theta_j \le \tau - 1/(\alpha-1)`.
* Fenchel--Young loss:
  :math:`L = \langle p - e_y, \theta\rangle +
  (q_y^{1-\alpha} - \sum_j q_j^{1-\alpha} p_j^\alpha)/(\alpha(\alpha-1))`,
  whose gradient is exactly :math:`p - e_y`.  With :math:`v = \theta - \tau`
  and :math:`\sum_j p_j = 1` it simplifies to
  :math:`L = \tfrac{\alpha-1}{\alpha}\langle p, v\rangle - v_y +
  \log_\alpha(1/q_y)/\alpha`, the form computed here (no large terms cancel).
* :math:`\alpha = 1` is the exact limit :math:`p = \mathrm{softmax}(\theta +
  \log q)`, :math:`L = \mathrm{CE}(\theta + \log q, y)`, computed on that path.

Root finding.  Every :math:`p_j \le 1` gives the lower bound
:math:`\tau \ge \tau_{lo} = \max_j[\theta_j - \log_\alpha(1/q_j)]`, so only the
classes with :math:`\theta_j > \tau_{lo} - 1/(\alpha-1)` can be in the support.
The solver keeps the top candidates (one ``topk``).  For
:math:`\alpha = 1 + 1/k` with an integer :math:`k \le 8` (the papers' 2, 1.5,
1.25) the root is exact from the candidates' sorted thresholds and prefix sums
of their powers (:func:`_exact_root`: one sort, no iteration over the columns).
Otherwise it runs a safeguarded Newton iteration on :math:`\varphi(\tau) = (\sum_j q_j z_j^k)^{1/k} - 1`,
:math:`z_j = [1 + (\alpha-1)(\theta_j - \tau)]_+`, from :math:`\tau_{lo}`.  For
:math:`1 < \alpha \le 2` :math:`\varphi` is convex and decreasing, so the
iterates rise monotonically to the root (3--6 passes to float32 accuracy); a
bracket :math:`[\tau_{lo}, \tau_{hi}]` with bisection guards :math:`\alpha > 2`.
The root on the kept candidates is itself a lower bound of the full root, and
certifies them when their smallest logit is out of its reach (see
:func:`solve_alpha_softargmax`).  Everything runs in float32 whatever the input dtype; the result is renormalised.
For :math:`1 < \alpha \le 2` without a general ``log_q`` the loss runs through
a kernel instead, with this solver (and cross-entropy at :math:`\alpha = 1`) as its
oracle: on CUDA the fused Triton kernel of :mod:`spkver.losses.fused` (from
:math:`\alpha = 1`), on the CPU the compiled one of :mod:`spkver.losses.cpu_kernel`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "alpha_softargmax",
    "alpha_divergence_loss",
    "SparseRows",
    "solve_alpha_softargmax",
    "SparsityStatistics",
    "loss_rows_and_statistics",
]

_REDUCTIONS = ("mean", "sum", "none")
#: Newton passes are cheap; the cap only guards against pathological rows.
_MAX_ITERATIONS = 60
#: Convergence is declared when every row's :math:`|\sum_j p_j - 1|` is below this,
_TOLERANCE = 1e-6
#: ... or its Newton step below this many units of float32 resolution of tau.
_STEP_RESOLUTION = 4 * torch.finfo(torch.float32).eps
#: Above this fraction of candidate classes the solve is done densely (no topk).
_DENSE_FRACTION = 0.25
#: Number of top logits tried first when the caller has no better guess.
_INITIAL_CANDIDATES = 16
#: The next batch's topk starts from what this fraction of the rows needed; wider rows are redone alone.
_HINT_QUANTILE = 0.9
#: A class is certified out of the support only when its logit is this far below the
#: threshold tau - 1/(alpha-1): far above float32's error in tau, far below any scale.
_CERTIFICATE_SLACK = 1e-3


def _log_alpha_of_inverse(log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    r""":math:`\log_\alpha(1/q) = \mathrm{expm1}((1-\alpha)\log q)/(\alpha-1)`, stable near 1."""
    return torch.expm1((1.0 - alpha) * log_q) / (alpha - 1.0)


@dataclass
class SparseRows:
    r"""The solution of the f-softargmax for a batch of rows.

    Attributes
    ----------
    probs : Tensor (B, K)
        :math:`p` on the candidate classes ``index`` (zero outside the support).
    shifted : Tensor (B, K)
        :math:`v = \theta - \tau` on the candidate classes.
    index : Tensor (B, K) or None
        Class index of each column; ``None`` when the solve was dense (K = C).
    tau : Tensor (B,)
        The threshold :math:`\tau` relative to the row maximum of the logits.
    num_classes : int
        C, the number of classes of the full rows.
    jacobian_diagonal : Tensor (B, K)
        :math:`g_j = \partial p_j / \partial \theta_j` at fixed :math:`\tau`
        (:math:`q_j^{\alpha-1} p_j^{2-\alpha}`), zero off the support.
    candidates_needed : int
        Columns a certified sparse solve of this batch needs (max candidates + 1).
    """

    probs: torch.Tensor
    shifted: torch.Tensor
    index: Optional[torch.Tensor]
    tau: torch.Tensor
    num_classes: int
    jacobian_diagonal: torch.Tensor
    candidates_needed: int

    def dense(self) -> torch.Tensor:
        """The full (B, C) probability matrix."""
        if self.index is None:
            return self.probs
        out = self.probs.new_zeros(self.probs.shape[0], self.num_classes)
        return out.scatter_add_(1, self.index, self.probs)  # add: a special target may appear twice

    def at(self, targets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Entries of ``values`` (B, K) at class ``targets`` (B,), zero if not a candidate."""
        if self.index is None:
            return values.gather(1, targets[:, None]).squeeze(1)
        hit = self.index == targets[:, None]
        return torch.where(hit, values, torch.zeros_like(values)).sum(1)

    def support_size(self) -> torch.Tensor:
        """Number of classes with :math:`p_j > 0` in each row."""
        return (self.probs > 0).sum(1)


def check_alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number >= 1, got {alpha!r}") from None
    if not math.isfinite(alpha) or alpha < 1.0:
        raise ValueError(f"alpha must be a finite number >= 1, got {alpha!r}")
    return alpha


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    """Check the structure of ``logits`` and return its row maxima, float32.

    The maxima also reveal NaN and +inf rows; :func:`_raise_for_bad_rows` reads them.
    """
    _check_logits_structure(logits)
    return _row_max(logits)


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().amax(dim=1).float() if logits.shape[0] else logits.new_zeros(0, dtype=torch.float32)


def _check_logits_structure(logits: torch.Tensor) -> None:
    """Type, shape and dtype of ``logits``: no device work."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (got 0 columns)")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")


def _problem_flag(row_max, targets=None, num_classes=None, target_logit=None, overrides=()) -> torch.Tensor:
    """A 0-d boolean tensor, true when some input is bad; computed on the device without a sync."""
    flags = [~torch.isfinite(row_max).all()]
    if targets is not None:
        flags.append(((targets < 0) | (targets >= num_classes)).any())
    if target_logit is not None:
        flags.append((target_logit == -math.inf).any())
    flags += [~torch.isfinite(value).all() for _, value in overrides]
    return torch.stack(flags).any()


def _raise_for_bad_rows(row_max, targets=None, num_classes=None, target_logit=None, overrides=(), flag=None):
    """Raise a ``ValueError`` naming the first problem; one device sync when there is none.

    ``overrides`` are (name, tensor) pairs that must be finite; ``flag`` is a
    :func:`_problem_flag` already read back as true (skips the first sync).
    """
    if flag is None and not bool(_problem_flag(row_max, targets, num_classes, target_logit, overrides)):
        return
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        value = float(row_max[row])
        if math.isnan(value):
            raise ValueError(f"logits contain NaN (first in row {row})")
        if value > 0:
            raise ValueError(f"logits contain +inf (first in row {row})")
        raise ValueError(f"logits row {row} is entirely -inf: no class is allowed")
    if targets is not None:
        out = (targets < 0) | (targets >= num_classes)
        if bool(out.any()):
            raise ValueError(f"targets must lie in [0, {num_classes - 1}], got {int(targets[out][0])}")
    for name, value in overrides:
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite")
    row = int((target_logit == -math.inf).nonzero()[0])
    raise ValueError(f"the target class of row {row} has logit -inf (masked): the loss is infinite")


def _check_log_q(log_q, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if log_q is None:
        return None
    if not isinstance(log_q, torch.Tensor):
        log_q = torch.as_tensor(log_q, dtype=torch.float32, device=logits.device)
    if log_q.requires_grad:
        raise ValueError(
            "log_q is treated as a constant reference measure and receives no gradient; "
            "pass log_q.detach()"
        )
    batch, classes = logits.shape
    if tuple(log_q.shape) not in ((classes,), (batch, classes)):
        raise ValueError(
            f"log_q must have shape ({classes},) or ({batch}, {classes}) to match logits, "
            f"got {tuple(log_q.shape)}"
        )
    log_q = log_q.to(device=logits.device, dtype=torch.float32)
    if bool(torch.isnan(log_q).any()) or bool((log_q == math.inf).any()):
        raise ValueError("log_q must not contain NaN or +inf (q must be finite and >= 0)")
    return log_q


def check_targets(targets, logits: torch.Tensor) -> torch.Tensor:
    """Check the shape and dtype of ``targets`` (their range is checked with the rows)."""
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets, device=logits.device)
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must have shape ({logits.shape[0]},) to match logits, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    return targets.to(device=logits.device, dtype=torch.long)


def _check_log_q_target(log_q_target, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """A (B,) float32 tensor; finiteness is checked with the rows (or here, for a number)."""
    if log_q_target is None:
        return None
    if isinstance(log_q_target, (int, float)):
        if not math.isfinite(log_q_target):
            raise ValueError(f"log_q_target must be finite, got {log_q_target!r}")
        return torch.full((logits.shape[0],), float(log_q_target), device=logits.device)
    log_q_target = torch.as_tensor(log_q_target, dtype=torch.float32, device=logits.device)
    if log_q_target.dim() == 0:
        log_q_target = log_q_target.expand(logits.shape[0])
    if tuple(log_q_target.shape) != (logits.shape[0],):
        raise ValueError(
            f"log_q_target must be a scalar or have shape ({logits.shape[0]},), "
            f"got {tuple(log_q_target.shape)}"
        )
    return log_q_target.detach()


#: alpha = 1 + 1/k with an integer k up to this (2, 1.5, 1.333.., 1.25, ...): powers are products,
#: and the root is found exactly from sorted prefix sums (:func:`_exact_root`).
_MAX_INTEGER_DEGREE = 8
#: Up to this many candidate columns the exact root is used; wider (dense) solves use Newton.
_MAX_EXACT_COLUMNS = 1024


def _integer_degree(alpha: float) -> Optional[int]:
    r""":math:`k = 1/(\alpha-1)` when it is an integer up to :data:`_MAX_INTEGER_DEGREE`, else ``None``."""
    k = 1.0 / (alpha - 1.0)
    degree = round(k)
    return degree if 1 <= degree <= _MAX_INTEGER_DEGREE and abs(k - degree) <= 1e-9 * degree else None


def _powers(z: torch.Tensor, alpha: float):
    r"""Return :math:`(z^k, z^{k-1})` for :math:`z \ge 0`, zero where :math:`z = 0`."""
    degree = _integer_degree(alpha)
    if degree == 1:  # sparsemax
        return z, (z > 0).to(z.dtype)
    if degree is not None:  # alpha = 1 + 1/n (1.5, 1.25, 1.333..): products, not exp and log
        lower = z
        for _ in range(degree - 2):
            lower = lower * z
        return lower * z, lower
    k = 1.0 / (alpha - 1.0)
    positive = z > 0
    log_z = torch.log(torch.where(positive, z, torch.ones_like(z)))
    zero = torch.zeros_like(z)
    return (
        torch.where(positive, torch.exp(k * log_z), zero),
        torch.where(positive, torch.exp((k - 1.0) * log_z), zero),
    )


def _newton_tau(bound, steepness, alpha, tau_lo, tau_hi):
    r"""Safeguarded Newton for :math:`\sum_j [1 + (\alpha-1) a_j (b_j - \tau)]_+^k = 1`.

    This is the f-softargmax equation written per class around
    :math:`b_j = \theta_j - \log_\alpha(1/q_j)` (where :math:`p_j` alone would
    be 1) with steepness :math:`a_j = q_j^{\alpha-1}`: no large terms cancel,
    whatever :math:`q`.  ``bound`` (B, K), ``steepness`` (B, K) or None (unit
    measure), bounds (B,).  Returns :math:`\tau` (B,), the unnormalised
    :math:`p` and :math:`g = \partial p_j/\partial b_j|_\tau` (both (B, K)).
    """
    lo, hi, tau = tau_lo.clone(), tau_hi.clone(), tau_lo.clone()
    last_step = torch.full_like(tau, math.inf)
    # Reading the error back costs a device sync: on accelerators check every few passes.
    check_every = 1 if bound.device.type == "cpu" else 3
    for iteration in range(_MAX_ITERATIONS):
        u = bound - tau[:, None]
        if steepness is not None:
            u = u * steepness
        z = (1.0 + (alpha - 1.0) * u).clamp_min_(0.0)
        w, w_prime = _powers(z, alpha)
        if steepness is not None:
            w_prime = w_prime * steepness
        mass = w.sum(1)
        slope = w_prime.sum(1)
        error = mass - 1.0
        above = error > 0
        lo = torch.where(above, tau, lo)
        hi = torch.where(above, hi, tau)
        # Newton on phi = mass^(1/k) - 1:  step = mass * (1 - mass^(-1/k)) / ((alpha-1) * slope)
        log_mass = torch.log(mass.clamp_min(1e-30))
        step = -mass * torch.expm1(-(alpha - 1.0) * log_mass) / ((alpha - 1.0) * slope)
        candidate = tau + step
        accept = (slope > 0) & (candidate >= lo) & (candidate <= hi) & torch.isfinite(candidate)
        if alpha > 2.0:
            # phi is not convex there: as in rtsafe, accept Newton only while its steps
            # halve, else bisect; this breaks the 2-cycles Newton can fall into.
            accept &= step.abs() <= 0.5 * last_step
        new_tau = torch.where(accept, candidate, 0.5 * (lo + hi))
        last_step = (new_tau - tau).abs()
        if (iteration + 1) % check_every == 0:
            # Converged where the mass is 1, or where tau no longer moves at float32 resolution: a
            # sum of many z_j near 1 carries rounding above the tolerance (sparsemax rows did not
            # converge and took every pass).
            done = (error.abs() <= _TOLERANCE) | (last_step <= _STEP_RESOLUTION * (1.0 + tau.abs()))
            if bool(done.all()):
                break
        tau = new_tau
    return tau, w, w_prime


#: The exact root's Newton (k > 2) stops when sigma moves by less than this (float64, relative to 1 + sigma).
_EXACT_STEP = 1e-12


def _exact_root(bound, steepness, alpha, degree):
    r"""The root of :math:`\sum_j [1 + (\alpha-1) a_j (b_j - \tau)]_+^k = 1` for an integer :math:`k`, without iterating over the columns.

    Column :math:`j` enters the support below its threshold :math:`t_j = b_j + 1/((\alpha-1)a_j)`,
    and there :math:`p_j = w_j (t_j - \tau)^k` with :math:`w_j = ((\alpha-1)a_j)^k`. With the
    thresholds sorted, :math:`t_{(1)} \ge t_{(2)} \ge \dots`, and :math:`\sigma = t_{(1)} - \tau`,
    :math:`u_j = t_{(1)} - t_{(j)}`, the mass of the first :math:`n` columns is a polynomial in
    :math:`\sigma` whose coefficients are prefix sums:

    .. math::
        M_n(\sigma) = \sum_{j \le n} w_j (\sigma - u_j)^k
        = \sum_{i=0}^{k} \binom{k}{i} (-1)^i \sigma^{k-i} \sum_{j \le n} w_j u_j^i .

    The mass at the next threshold, :math:`M_n(u_{n+1})`, rises with :math:`n`; the support is
    the first :math:`n` for which it reaches 1, and :math:`\sigma` the root of :math:`M_n = 1` on
    :math:`[u_n, u_{n+1}]`: in closed form for :math:`k \le 2` (sparsemax, 1.5-entmax), else by
    Newton from Jensen's upper bound :math:`\bar u + W^{-1/k}` (:math:`W = \sum w_j`,
    :math:`\bar u` the :math:`w`-mean of :math:`u`), from which it falls monotonically. One sort
    and a fixed number of passes over the (B, K) columns, in float64: every term
    :math:`w_j^{1/k}\sigma, w_j^{1/k}u_j` is at most :math:`\max_j a_y/a_j`, so little cancels.
    Returns :math:`\tau` (B,), float32.
    """
    b = bound.double()
    d = (alpha - 1.0) * (1.0 if steepness is None else steepness.double())
    thresholds, order = (b + 1.0 / d).sort(dim=1, descending=True)
    valid = torch.isfinite(thresholds)  # excluded columns (-inf) sort last
    u = torch.where(valid, thresholds[:, :1] - thresholds, torch.zeros_like(thresholds))
    weight = d ** degree if steepness is None else d.gather(1, order) ** degree
    # sums[:, n, i] = sum over the first n + 1 columns of w_j u_j^i (powers by products, not pow)
    terms = [torch.where(valid, weight, torch.zeros_like(u))]
    for _ in range(degree):
        terms.append(terms[-1] * u)
    sums = torch.stack(terms, dim=2).cumsum(1)
    signed_binomials = [(-1.0) ** i * math.comb(degree, i) for i in range(degree + 1)]
    following = F.pad(u[:, 1:], (0, 1))
    mass_at_next = signed_binomials[0] * sums[..., 0]  # Horner in the next threshold
    for i in range(1, degree + 1):
        mass_at_next = mass_at_next * following + signed_binomials[i] * sums[..., i]
    mass_at_next = torch.where(F.pad(valid[:, 1:], (0, 1)), mass_at_next, torch.full_like(mass_at_next, math.inf))
    last = (mass_at_next < 1.0).sum(1, keepdim=True)  # the support's last column
    prefix = sums.gather(1, last[..., None].expand(-1, 1, degree + 1)).squeeze(1)  # (B, k + 1)
    total, first_moment = prefix[:, 0], prefix[:, 1]
    if degree == 1:
        sigma = (1.0 + first_moment) / total
    elif degree == 2:  # the larger root of W s^2 - 2 P1 s + P2 - 1 = 0; both terms of the sum are >= 0
        sigma = (first_moment + (first_moment ** 2 - total * (prefix[:, 2] - 1.0)).clamp_min(0.0).sqrt()) / total
    else:
        exponents = torch.arange(degree + 1, dtype=torch.float64, device=b.device)
        polynomial = prefix * torch.tensor(signed_binomials, dtype=torch.float64, device=b.device)
        # M(s) - 1 = sum_i polynomial_i s^(k-i) - 1
        slope = polynomial[:, :-1] * (degree - exponents[:-1])
        # Both Jensen's bound and the next threshold (mass >= 1 there) lie at or above the root.
        upper = following.gather(1, last).squeeze(1)
        jensen = first_moment / total + total ** (-1.0 / degree)
        sigma = torch.where(upper > 0, torch.minimum(jensen, upper), jensen)
        for _ in range(_MAX_ITERATIONS):
            powers = sigma[:, None] ** (degree - exponents)
            excess = (polynomial * powers).sum(1) - 1.0
            step = excess / (slope * powers[:, 1:]).sum(1)
            sigma = sigma - step
            if bool((step.abs() <= _EXACT_STEP * (1.0 + sigma.abs())).all()):
                break
    return (thresholds[:, 0] - sigma).float()


#: The exact root's float64 prefix sums carry terms up to (max_j a_j / min_j a_j)^k: it is used
#: while that is below e^16 (rounding ~1e-8 of the unit mass); Q-Margin's measure has a ratio of
#: e^((alpha-1) s m), k log of it (alpha-1) s m k = s m, 2 for the papers' settings.
_MAX_EXACT_LOG_SPREAD = 16.0


def _log_steepness_spread(bound, steepness) -> float:
    r"""The largest :math:`\log(\max_j a_j / \min_j a_j)` of a row, over its allowed columns."""
    log_steepness = steepness.log()
    allowed = torch.isfinite(bound)
    spread = (log_steepness.masked_fill(~allowed, -math.inf).amax(1)
              - log_steepness.masked_fill(~allowed, math.inf).amin(1))
    return float(spread.nan_to_num(0.0, posinf=0.0, neginf=0.0).max()) if spread.numel() else 0.0


#: Largest steepness a_j = q_j^(alpha-1) used: the window of tau over which such a
#: class goes from p_j = 1 to 0 is already far below float32 resolution.
_MAX_LOG_STEEPNESS = 69.0


def _bound_and_steepness(theta, log_q, alpha):
    r"""Per-class :math:`b_j = \theta_j - \log_\alpha(1/q_j)` and :math:`a_j = q_j^{\alpha-1}`.

    Classes with :math:`q_j = 0`, or so small that :math:`q_j^{1-\alpha}`
    overflows float32, are excluded (:math:`b_j = -\infty`): their
    :math:`p_j` is below float32 resolution.
    """
    bound = theta - _log_alpha_of_inverse(log_q, alpha)
    steepness = torch.exp(((alpha - 1.0) * log_q).clamp(max=_MAX_LOG_STEEPNESS))
    excluded = ~torch.isfinite(bound) | (steepness == 0)
    if bool(excluded.any()):
        bound = bound.masked_fill(excluded, -math.inf)
        steepness = steepness.masked_fill(excluded, 1.0)
    return bound, steepness


def _target_lower_bound(theta_y, others_max, log_q_target, alpha):
    r""":math:`\tau_{lo} = \max(b_y, \max_{j \ne y}\theta_j)` when only the target is special."""
    if log_q_target is None:
        return torch.maximum(others_max, theta_y)
    return torch.maximum(others_max, theta_y - _log_alpha_of_inverse(log_q_target, alpha))


def solve_alpha_softargmax(
    logits: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    log_q_target: Optional[torch.Tensor] = None,
    row_max: Optional[torch.Tensor] = None,
    candidates_hint: Optional[int] = None,
    target_logits: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
) -> SparseRows:
    r"""Solve the f-softargmax for :math:`\alpha > 1` on the provable support candidates.

    Inputs are assumed validated (see :func:`alpha_softargmax`).  ``log_q`` is
    (C,) or (B, C).  Two per-row overrides at ``targets`` avoid building a
    modified (B, C) copy: ``log_q_target`` (B,) replaces :math:`\log q_y` (all
    other classes then have unit mass unless ``log_q`` is given), and
    ``target_logits`` (B,) replaces :math:`\theta_y` (a margin on the target).
    Computation is in float32.

    The top ``candidates_hint`` logits of each row (16 by default) are taken
    with one ``topk``, the equation is solved on them alone, and the result is
    *certified*: the root :math:`\tau_K` on a subset is a lower bound of the
    full root (a subset has less mass at every :math:`\tau`), so if the
    smallest kept logit lies below :math:`\tau_K - 1/(\alpha-1)`, no class
    left out can be in the support and :math:`\tau_K` is the root. That
    bound is far tighter than :math:`\tau_{lo}` when many classes crowd the top
    of a row (random embeddings at the papers' small scales), so the ``topk``
    stays about the size of the support. Rows that fail make the solve take
    every class above their threshold and redo the ``topk`` (which then
    certifies); above a quarter of the classes the solve is dense.  With
    a special target, its column is appended to the candidates (and masked
    out of the ``topk`` part), so ``index`` may name the target twice, once
    with :math:`p = 0`.
    """
    theta = logits.detach().float()
    batch, classes = theta.shape
    if row_max is None:
        row_max = theta.amax(1)
    if logit_scale != 1.0:
        row_max = row_max * logit_scale
        if log_q is not None:  # the general path is dense: scale once
            theta, logit_scale = theta * logit_scale, 1.0
    if log_q is not None and log_q.dim() == 1:
        log_q = log_q[None, :].expand(batch, classes)
    if log_q is not None and log_q_target is not None:
        log_q = log_q.scatter(1, targets[:, None], log_q_target[:, None])
    if log_q is not None and target_logits is not None:
        theta = theta.scatter(1, targets[:, None], target_logits[:, None])  # the general path is dense anyway
        target_logits = None
    special_target = log_q is None and (log_q_target is not None or target_logits is not None)
    reach = 1.0 / (alpha - 1.0)  # p_j > 0 requires theta_j > tau - reach
    if special_target:
        theta_y = target_logits if target_logits is not None else \
            theta.gather(1, targets[:, None]).squeeze(1) * logit_scale

    tau_lo = row_max  # unit measure: tau >= max_j theta_j
    if log_q is not None:  # a general measure needs every class's bound b_j (one pass)
        bound = _bound_and_steepness(theta - row_max[:, None], log_q, alpha)[0]
        tau_lo = bound.amax(1) + row_max
        if not bool(torch.isfinite(tau_lo).all()):
            row = int((~torch.isfinite(tau_lo)).nonzero()[0])
            raise ValueError(
                f"log_q of row {row} is too small for float32 at alpha={alpha}: q^(1-alpha) overflows "
                "for every allowed class; rescale q (scaling q by c equals scaling the logits by c^(alpha-1))"
            )

    if not special_target:
        theta_y = None
    k = min(classes, max(2, candidates_hint or _INITIAL_CANDIDATES))
    while True:
        solution, certified, threshold = _attempt(theta, k, targets, theta_y, log_q, log_q_target, tau_lo,
                                                  row_max, alpha, reach, logit_scale)
        if bool(certified.all()):
            break
        # Every class in the support of a failed row is at or above its threshold: take them all.
        failed = (~certified).nonzero().squeeze(1)
        wider = int((theta[failed] * logit_scale >= threshold[failed, None]).sum(1).max()) + 2
        if 4 * failed.numel() > batch:  # many rows: the whole batch again, wider
            k = wider
            continue
        # A few rows: only they are solved again (they certify at that width), so that one
        # row with a wide support does not widen the topk of the whole batch.
        pick = (lambda x: None if x is None else x[failed])
        redo, redo_certified, _ = _attempt(theta[failed], wider, pick(targets), pick(theta_y),
                                           None if log_q is None else log_q[failed], pick(log_q_target),
                                           tau_lo[failed], row_max[failed], alpha, reach, logit_scale)
        if bool(redo_certified.all()):
            solution = _merge_rows(solution, redo, failed, classes)
            break
        k = max(k, wider)  # never reached in exact arithmetic; stay correct if rounding disagrees
    tau, w, w_prime, shifted, index, needed = solution
    total = w.sum(1, keepdim=True)
    probs = w / total
    return SparseRows(probs=probs, shifted=shifted, index=index, tau=tau,
                      num_classes=classes, jacobian_diagonal=w_prime / total, candidates_needed=min(needed, classes))


def _attempt(theta, k, targets, theta_y, log_q, log_q_target, tau_lo, row_max, alpha, reach, logit_scale=1.0):
    """One solve on the top ``k`` logits of every row (dense past a quarter of the classes).

    ``theta`` are the logits divided by ``logit_scale`` (cosines): only the kept columns are scaled.

    ``theta_y`` (B,) is given when the target is special (its own logit or mass, unit measure
    elsewhere). Returns ``((tau, w, w_prime, shifted, index, needed), certified, threshold)``:
    ``certified`` (B,) marks the rows whose left-out classes provably have p = 0, and
    ``needed`` the candidates that most rows of the batch needed (a hint for the next one).
    """
    batch, classes = theta.shape
    if k > _DENSE_FRACTION * classes:
        theta = theta * logit_scale if logit_scale != 1.0 else theta
        sub_theta, sub_log_q = theta, log_q
        if theta_y is not None:
            others = theta.scatter(1, targets[:, None], -math.inf).amax(1)
            tau_lo = _target_lower_bound(theta_y, others, log_q_target, alpha)
            sub_theta = theta.scatter(1, targets[:, None], theta_y[:, None])
            if log_q_target is not None:
                sub_log_q = theta.new_zeros(batch, classes).scatter_(1, targets[:, None], log_q_target[:, None])
        tau, w, w_prime, shifted = _solve_candidates(sub_theta, sub_log_q, tau_lo, row_max, alpha)
        certified = torch.ones(batch, dtype=torch.bool, device=theta.device)
        return (tau, w, w_prime, shifted, None, classes), certified, None
    sub_theta, index = theta.topk(k, dim=1, sorted=False)
    if logit_scale != 1.0:
        sub_theta = sub_theta * logit_scale
    sub_log_q = None
    if theta_y is not None:
        is_target = index == targets[:, None]
        others_theta = sub_theta.masked_fill(is_target, -math.inf)
        tau_lo = _target_lower_bound(theta_y, others_theta.amax(1), log_q_target, alpha)
        smallest = sub_theta.masked_fill(is_target, math.inf).amin(1)
        # The target's column is appended (its own logit and mass); in the topk part it has p = 0.
        sub_theta = torch.cat([others_theta, theta_y[:, None]], dim=1)
        index = torch.cat([index, targets[:, None]], dim=1)
    else:
        smallest = sub_theta.amin(1)
        if log_q is not None:
            sub_log_q = log_q.gather(1, index)
    # The root on any subset of the classes is a lower bound of the full root (a subset has less
    # mass at every tau), and a far tighter one than tau_lo when many classes are near the top,
    # as with random embeddings at a small scale.
    tau, w, w_prime, shifted = _solve_candidates(sub_theta, sub_log_q, tau_lo, row_max, alpha,
                                                 log_q_last=log_q_target if theta_y is not None else None)
    threshold = tau + row_max - (reach + _CERTIFICATE_SLACK)
    # Certified: every class left out of the topk has theta_j < tau - 1/(alpha-1), so p_j = 0
    # exactly, and tau is the root of the whole row.
    certified = smallest < threshold
    counts = (sub_theta >= threshold[:, None]).sum(1)
    # What most rows needed, plus one column to certify them: the few wider rows are redone alone.
    needed = int(counts.kthvalue(max(1, math.ceil(_HINT_QUANTILE * batch))).values) + 1
    return (tau, w, w_prime, shifted, index, needed), certified, threshold


def _merge_rows(solution, redo, rows, classes):
    """``solution`` with the rows ``rows`` replaced by ``redo``, padded to a common width with p = 0."""
    def columns(part):
        tau, w, w_prime, shifted, index, needed = part
        if index is None:  # a dense solve: every class is a candidate
            index = torch.arange(classes, device=w.device).expand(w.shape[0], classes)
        return tau, w, w_prime, shifted, index, needed

    solution, redo = columns(solution), columns(redo)
    width = max(solution[1].shape[1], redo[1].shape[1])

    def padded(part):
        tau, w, w_prime, shifted, index, _ = part
        extra = width - w.shape[1]
        if extra == 0:
            return w, w_prime, shifted, index
        # Padding columns repeat a candidate's class with p = 0 (the loss masks their shifted -inf).
        return (F.pad(w, (0, extra)), F.pad(w_prime, (0, extra)), F.pad(shifted, (0, extra), value=-math.inf),
                torch.cat([index, index[:, :1].expand(-1, extra)], dim=1))

    merged = [tensor.index_copy(0, rows, part) for tensor, part in zip(padded(solution), padded(redo))]
    tau = solution[0].index_copy(0, rows, redo[0])
    w, w_prime, shifted, index = merged
    return tau, w, w_prime, shifted, index, solution[5]


def _solve_candidates(sub_theta, sub_log_q, tau_lo, row_max, alpha, log_q_last=None):
    r"""The root on the candidate columns, in logits shifted by ``row_max``.

    ``sub_log_q`` (B, K) is the measure on the columns (``None``: unit); ``log_q_last`` (B,)
    instead makes it unit except on the last column (the appended target), without (B, K) work.

    Exact from sorted prefix sums for :math:`\alpha = 1 + 1/k` with a small integer :math:`k`
    (:func:`_exact_root`), else safeguarded Newton (:func:`_newton_tau`). Returns :math:`\tau`
    (shifted), the unnormalised :math:`p`, :math:`\partial p/\partial b` and the shifted logits
    minus :math:`\tau`.
    """
    sub_theta = sub_theta - row_max[:, None]  # exact for the top classes; p is shift invariant
    tau_lo = tau_lo - row_max
    if log_q_last is not None:
        bound_last, steepness_last = _bound_and_steepness(sub_theta[:, -1], log_q_last, alpha)
        bound = torch.cat([sub_theta[:, :-1], bound_last[:, None]], dim=1)
        steepness = F.pad(steepness_last[:, None], (sub_theta.shape[1] - 1, 0), value=1.0)
    elif sub_log_q is None:
        bound, steepness = sub_theta, None
    else:
        bound, steepness = _bound_and_steepness(sub_theta, sub_log_q, alpha)
    n = sub_theta.shape[1]
    degree = _integer_degree(alpha)
    exact = degree is not None and n <= _MAX_EXACT_COLUMNS
    if exact and steepness is not None:  # the spread is read (a sync) only where the exact root may run
        if log_q_last is not None:
            log_spread = (alpha - 1.0) * float(log_q_last.abs().max()) if log_q_last.numel() else 0.0
        else:
            log_spread = _log_steepness_spread(bound, steepness)
        exact = degree * log_spread <= _MAX_EXACT_LOG_SPREAD
    if not exact:
        # Upper bound: every p_j <= 1/n once a_j (b_j - tau) <= log_alpha(1/n) <= 0 for all j.
        margin = -math.expm1(-(alpha - 1.0) * math.log(n)) / (alpha - 1.0)
        tau_hi = (bound + margin if steepness is None else bound + margin / steepness).amax(1)
        tau_hi = torch.maximum(tau_hi, tau_lo).nan_to_num(posinf=torch.finfo(torch.float32).max / 4)
        tau, w, w_prime = _newton_tau(bound, steepness, alpha, tau_lo, tau_hi)
        return tau, w, w_prime, sub_theta - tau[:, None]
    tau = torch.maximum(_exact_root(bound, steepness, alpha, degree), tau_lo)
    u = bound - tau[:, None]
    if steepness is not None:
        u = u * steepness
    w, w_prime = _powers((1.0 + (alpha - 1.0) * u).clamp_min_(0.0), alpha)
    if steepness is not None:
        w_prime = w_prime * steepness
    return tau, w, w_prime, sub_theta - tau[:, None]


class _AlphaSoftargmax(torch.autograd.Function):
    r"""f-softargmax with its exact Jacobian-vector product.

    With :math:`g_j = \partial p_j/\partial\theta_j|_\tau` on the
    support (zero elsewhere), :math:`J = \mathrm{diag}(g) - g g^\top / \sum g`.
    """

    @staticmethod
    def forward(ctx, logits, alpha, log_q, row_max):
        rows = solve_alpha_softargmax(logits, alpha, log_q=log_q, row_max=row_max)
        p = rows.dense()
        g = rows.jacobian_diagonal
        ctx.save_for_backward(g, rows.index if rows.index is not None else torch.empty(0))
        ctx.dense = rows.index is None
        ctx.num_classes = logits.shape[1]
        ctx.input_dtype = logits.dtype
        return p.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        g, index = ctx.saved_tensors
        grad_p = grad_p.float()
        if not ctx.dense:
            grad_p = grad_p.gather(1, index)
        gd = g * grad_p
        grad_sub = gd - g * (gd.sum(1, keepdim=True) / g.sum(1, keepdim=True))
        if ctx.dense:
            grad = grad_sub
        else:
            grad = grad_sub.new_zeros(grad_sub.shape[0], ctx.num_classes).scatter_(1, index, grad_sub)
        return grad.to(ctx.input_dtype), None, None, None


def alpha_softargmax(logits: torch.Tensor, alpha: float, log_q: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The alpha-divergence f-softargmax of each row of ``logits``.

    .. math::
        p_j = q_j\,[1 + (\alpha-1)(\theta_j - \tau)]_+^{1/(\alpha-1)},
        \qquad \sum_j p_j = 1,

    and :math:`p = \mathrm{softmax}(\theta + \log q)` at :math:`\alpha = 1`.

    Parameters
    ----------
    logits : Tensor (B, C)
        Any floating dtype; computed in float32, returned in the input dtype.
        ``-inf`` masks a class out.
    alpha : float
        :math:`\alpha \ge 1`; :math:`\alpha > 1` gives sparse outputs.
    log_q : Tensor (C,) or (B, C), optional
        Log of the reference measure :math:`q` (a constant); default
        :math:`q \equiv 1`.

    Returns
    -------
    Tensor (B, C), rows summing to 1, differentiable with respect to ``logits``.

    Examples
    --------
    >>> p = alpha_softargmax(torch.tensor([[3.0, 2.5, 0.0]]), alpha=1.5)
    >>> p
    tensor([[0.6740, 0.3260, 0.0000]])
    >>> float(p.sum())
    1.0
    """
    alpha = check_alpha(alpha)
    row_max = _check_logits(logits)
    _raise_for_bad_rows(row_max)
    log_q = _check_log_q(log_q, logits)
    if alpha == 1.0:
        shifted = logits.float() if log_q is None else logits.float() + log_q
        return torch.softmax(shifted, dim=1).to(logits.dtype)
    return _AlphaSoftargmax.apply(logits, alpha, log_q, row_max)


class _AlphaDivergenceLoss(torch.autograd.Function):
    """Per-row Fenchel--Young loss; backward is a scaling of the saved :math:`p - e_y`.

    With ``target_logits`` the target's logit is that tensor, not the column
    of ``logits``: the gradient :math:`p_y - 1` goes to it, and zero to the column.
    """

    @staticmethod
    def forward(ctx, logits, targets, alpha, log_q, log_q_target, row_max, candidates_hint, target_logits,
                logit_scale):
        detached_target = None if target_logits is None else target_logits.detach().float()
        rows = solve_alpha_softargmax(
            logits, alpha, log_q=log_q, targets=targets, log_q_target=log_q_target, row_max=row_max,
            candidates_hint=candidates_hint, target_logits=detached_target, logit_scale=logit_scale,
        )
        if log_q_target is not None:
            log_q_y = log_q_target
        elif log_q is not None:
            log_q_y = log_q[targets] if log_q.dim() == 1 else log_q.gather(1, targets[:, None]).squeeze(1)
        else:
            log_q_y = None
        theta_y = detached_target if detached_target is not None else \
            logits.detach().float().gather(1, targets[:, None]).squeeze(1) * logit_scale
        v_y = theta_y - row_max * logit_scale - rows.tau
        inner = torch.where(rows.probs > 0, rows.probs * rows.shifted, torch.zeros_like(rows.probs))  # -inf masked
        loss = (alpha - 1.0) / alpha * inner.sum(1) - v_y
        if log_q_y is not None:
            loss = loss + _log_alpha_of_inverse(log_q_y, alpha) / alpha
        loss = loss.clamp_min(0.0)  # the loss is >= 0; remove float32 rounding below zero
        p_y = rows.at(targets, rows.probs)
        support = rows.support_size()
        columns = torch.tensor(rows.candidates_needed)
        ctx.save_for_backward(rows.probs, rows.index if rows.index is not None else torch.empty(0), targets, p_y)
        ctx.dense = rows.index is None
        ctx.num_classes = logits.shape[1]
        ctx.input_dtype = logits.dtype
        ctx.separate_target = target_logits is not None
        ctx.logit_scale = logit_scale
        ctx.target_dtype = None if target_logits is None else target_logits.dtype
        ctx.mark_non_differentiable(p_y, support, columns)
        return loss, p_y, support, columns

    @staticmethod
    def backward(ctx, grad_loss, _grad_p_y, _grad_support, _grad_columns):
        probs, index, targets, p_y = ctx.saved_tensors
        scale = grad_loss.float()[:, None]
        target_scale = scale  # the target logit's own gradient is in logit units
        if ctx.logit_scale != 1.0:  # d theta / d logits = logit_scale, folded into the kept columns
            scale = scale * ctx.logit_scale
        if ctx.dense:
            grad = probs * scale
        else:
            grad = probs.new_zeros(probs.shape[0], ctx.num_classes).scatter_add_(1, index, probs * scale)
        grad_target = None
        if ctx.separate_target:
            grad.scatter_(1, targets[:, None], 0.0)
            grad_target = ((p_y - 1.0) * target_scale.squeeze(1)).to(ctx.target_dtype)
        else:
            grad.scatter_add_(1, targets[:, None], -scale)
        return grad.to(ctx.input_dtype), None, None, None, None, None, None, grad_target, None


@dataclass
class SparsityStatistics:
    r"""Per-batch statistics of the posterior :math:`p` behind a loss.

    Attributes
    ----------
    support_size : float
        Mean number of classes with :math:`p_j > 0` per row.
    target_zero_fraction : float
        Fraction of rows whose target has :math:`p_y = 0` (the A3M collapse).
    target_prob : float
        Mean :math:`p_y`.
    candidates : int
        Columns per row the solver needed: the largest number of classes in
        reach of :math:`\tau_{lo}` plus one (C at :math:`\alpha = 1`); the
        objectives start the next batch's ``topk`` from it.
    """

    support_size: float
    target_zero_fraction: float
    target_prob: float
    candidates: int = 0


def loss_rows_and_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    log_q_target: Optional[torch.Tensor] = None,
    candidates_hint: Optional[int] = None,
    target_logits: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    target_logit_slope: Optional[torch.Tensor] = None,
):
    """Validated per-row loss (B,) with its :class:`SparsityStatistics`.

    The shared engine of :func:`alpha_divergence_loss` and of the margin
    objectives; see there for the arguments.  ``candidates_hint`` is the
    number of top logits to try first (see :func:`solve_alpha_softargmax`);
    ``target_logits`` (B,) replaces each row's target logit (a margin) without
    a modified copy of ``logits`` and receives its gradient.  ``logit_scale``
    multiplies ``logits`` (not ``target_logits``, already in logit units)
    inside the solve: the margin objectives pass cosines and :math:`s`, so
    that only the kept columns are scaled and no (B, C) product is made.
    ``target_logit_slope`` (B,) says that ``target_logits`` is a function of
    the target's column (a geometric margin :math:`s\psi(x_y)`) with this
    derivative :math:`s\psi'(x_y)`: its gradient then goes to that column
    (``target_logits`` may be detached), which the CPU kernel writes in its one
    gradient pass instead of a (B, C) scatter through a ``gather``.  For
    :math:`\alpha = 1` the support is reported as all C classes.
    """
    alpha = check_alpha(alpha)
    _check_logits_structure(logits)
    targets = check_targets(targets, logits)
    log_q = _check_log_q(log_q, logits)
    log_q_target = _check_log_q_target(log_q_target, logits)
    if target_logits is not None and (
            not isinstance(target_logits, torch.Tensor) or tuple(target_logits.shape) != (logits.shape[0],)):
        raise ValueError(f"target_logits must be a tensor of shape ({logits.shape[0]},)")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    logit_scale = float(logit_scale)
    if target_logit_slope is not None and (
            target_logits is None or not isinstance(target_logit_slope, torch.Tensor)
            or tuple(target_logit_slope.shape) != (logits.shape[0],)):
        raise ValueError(f"target_logit_slope must be a tensor of shape ({logits.shape[0]},), "
                         "given with target_logits")
    batch, classes = logits.shape
    if batch == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty.requires_grad_(logits.requires_grad), SparsityStatistics(math.nan, math.nan, math.nan)

    from spkver.losses.cpu_kernel import CpuAlphaDivergenceLoss, cpu_kernel_available
    from spkver.losses.fused import FusedAlphaDivergenceLoss, fused_available

    on_cpu_kernel = cpu_kernel_available(logits, alpha, log_q)
    if target_logit_slope is not None and not on_cpu_kernel:
        # Elsewhere the target logit carries the slope in its graph: its value, and d/d column = slope.
        column = logits.gather(1, targets.clamp(0, classes - 1)[:, None]).squeeze(1)
        target_logits = target_logits.detach() + target_logit_slope.detach() * (column - column.detach())
        target_logit_slope = None

    fused = fused_available(logits, alpha, log_q)
    if logit_scale != 1.0 and (alpha == 1.0 or fused):
        logits, logit_scale = logits * logit_scale, 1.0  # these paths read every logit anyway
    if fused:
        # One launch: the kernel checks the inputs itself and sums the statistics; one read-back.
        loss, totals = FusedAlphaDivergenceLoss.apply(logits, targets, alpha, log_q_target, target_logits)
        statistics = statistics_from_totals(totals, batch, classes)
        if statistics is None:
            checks = _check_arguments(logits, targets, targets.clamp(0, classes - 1), log_q_target, target_logits)
            _raise_for_bad_rows(*checks, flag=True)
        return loss, statistics
    safe_targets = targets.clamp(0, classes - 1)  # never index out of range; the range is checked
    if on_cpu_kernel:
        # The kernel reads every row once and returns its maximum: the input is checked on that, after it.
        loss, p_y, support, row_max = CpuAlphaDivergenceLoss.apply(logits, safe_targets, alpha, log_q_target,
                                                                   target_logits, logit_scale, target_logit_slope)
        checks = _check_arguments(logits, targets, safe_targets, log_q_target, target_logits, row_max)
        if bool(_problem_flag(*checks)):
            _raise_for_bad_rows(*checks, flag=True)
        return loss, _statistics(support, p_y, int(support.max()) + 1)
    checks = _check_arguments(logits, targets, safe_targets, log_q_target, target_logits)
    problem = _problem_flag(*checks)
    # On a GPU every read-back is a sync: for cross-entropy the checks travel back with the
    # statistics in one transfer, and a bad input still raises before anything is returned
    # (safe_targets keep every index in range meanwhile). Elsewhere, check first.
    deferred = logits.is_cuda and alpha == 1.0
    if not deferred and bool(problem):
        _raise_for_bad_rows(*checks, flag=True)
    if alpha == 1.0:
        loss = _cross_entropy_rows(logits, safe_targets, log_q, log_q_target, target_logits)
        p_y, support, columns = torch.exp(-loss.detach()), torch.full_like(loss, classes), classes
    else:
        loss, p_y, support, columns = _AlphaDivergenceLoss.apply(
            logits, safe_targets, alpha, log_q, log_q_target, checks[0], candidates_hint, target_logits,
            logit_scale,
        )
        columns = int(columns)
    return loss, _statistics(support, p_y, columns, checks if deferred else None, problem if deferred else None)


def _check_arguments(logits, targets, safe_targets, log_q_target, target_logits, row_max=None):
    """The arguments of :func:`_problem_flag` / :func:`_raise_for_bad_rows` for one call (``row_max`` if known)."""
    target_logit = logits.detach().gather(1, safe_targets[:, None]).squeeze(1) if target_logits is None \
        else target_logits.detach()
    overrides = [(name, value.detach()) for name, value in
                 (("log_q_target", log_q_target), ("target_logits", target_logits)) if value is not None]
    return _row_max(logits) if row_max is None else row_max, targets, logits.shape[1], target_logit, overrides


def statistics_from_totals(totals: torch.Tensor, rows: int, classes: int) -> Optional[SparsityStatistics]:
    """:class:`SparsityStatistics` from the fused kernel's ``totals``; ``None`` if it found a bad input."""
    support, target_zero, target_prob, problems = totals.tolist()  # the one device sync
    if problems:
        return None
    return SparsityStatistics(support / rows, target_zero / rows, target_prob / rows, classes)


def _cross_entropy_rows(logits, targets, log_q, log_q_target, target_logits) -> torch.Tensor:
    """alpha = 1: cross-entropy of theta + log q (with the target's logit and log q overridable)."""
    shifted = logits.float()
    if target_logits is not None:
        shifted = shifted.scatter(1, targets[:, None], target_logits.float()[:, None])
    if log_q is not None:
        shifted = shifted + log_q
    if log_q_target is not None:
        theta_y = shifted.gather(1, targets[:, None])
        if log_q is not None:
            theta_y = theta_y - (log_q if log_q.dim() == 2 else log_q[None, :].expand_as(shifted)) \
                .gather(1, targets[:, None])
        shifted = shifted.scatter(1, targets[:, None], theta_y + log_q_target[:, None])
    return F.cross_entropy(shifted, targets, reduction="none")


@torch.no_grad()
def _statistics(support: torch.Tensor, p_y: torch.Tensor, candidates: int, checks=None,
                problem: Optional[torch.Tensor] = None) -> SparsityStatistics:
    """Batch statistics, read from the device in one transfer (with the input checks, when deferred)."""
    values = [support.float().mean(), (p_y == 0).float().mean(), p_y.float().mean()]
    if problem is not None:
        values.append(problem.float())
    values = torch.stack(values).tolist()
    if problem is not None and values[3]:
        _raise_for_bad_rows(*checks, flag=True)
    return SparsityStatistics(values[0], values[1], values[2], candidates)


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def alpha_divergence_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    log_q_target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Fenchel--Young loss of the alpha-divergence.

    .. math::
        L(\theta, y; q) = \langle p - e_y, \theta\rangle
        + \frac{q_y^{1-\alpha} - \sum_j q_j^{1-\alpha} p_j^\alpha}{\alpha(\alpha-1)}
        \;\ge 0,

    with :math:`p` = :func:`alpha_softargmax` :math:`(\theta; q)`; zero iff
    :math:`p = e_y`.  :math:`\partial L/\partial\theta = p - e_y` exactly.  At
    :math:`\alpha = 1` it is the cross-entropy of :math:`\theta + \log q`, and
    with :math:`q \equiv 1` the entmax loss.

    Parameters
    ----------
    logits : Tensor (B, C)
        Any floating dtype (computed in float32; the gradient has the input dtype).
    targets : Tensor (B,)
        Integer classes in ``[0, C)``.
    alpha : float
        :math:`\alpha \ge 1`.
    log_q : Tensor (C,) or (B, C), optional
        Log reference measure (a constant); default :math:`q \equiv 1`.
    reduction : {"mean", "sum", "none"}
    log_q_target : Tensor (B,) or float, optional
        :math:`\log q_y` of each row's target, overriding ``log_q`` there: the
        Q-Margin measure without building a (B, C) tensor.

    The loss is returned in float32; its value overflows to ``inf`` only when
    the exact value exceeds float32's range (possible only for extreme ``q``
    and large ``alpha``, e.g. :math:`q_y^{1-\alpha} > 10^{38}`).

    Examples
    --------
    >>> logits = torch.tensor([[3.0, 2.5, 0.0], [0.0, 1.0, 4.0]])
    >>> alpha_divergence_loss(logits, torch.tensor([0, 2]), alpha=1.5, reduction="none")
    tensor([0.1844, 0.0000])
    """
    check_reduction(reduction)
    loss, _ = loss_rows_and_statistics(logits, targets, alpha, log_q=log_q, log_q_target=log_q_target)
    return reduce_loss(loss, reduction)
