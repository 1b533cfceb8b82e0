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

This module is the maths and this solver only.  The loss itself runs on one of
the engines of :mod:`spkver.losses.engines` (the Triton kernel on CUDA, the
compiled CPU kernel, this solver, or cross-entropy at :math:`\alpha = 1`),
chosen by their registry; this solver is the oracle the kernels are tested
against.  Input checks live in :mod:`spkver.losses.checks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from spkver.losses.checks import InputCheck, LossInputError, check_alpha, check_log_q, check_logits_structure
from spkver.losses.checks import row_max as row_maxima

__all__ = [
    "alpha_softargmax",
    "SparseRows",
    "solve_alpha_softargmax",
    "log_alpha_of_inverse",
    "CERTIFICATE_SLACK",
]

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
CERTIFICATE_SLACK = 1e-3


def log_alpha_of_inverse(log_q, alpha: float):
    r""":math:`\log_\alpha(1/q) = \mathrm{expm1}((1-\alpha)\log q)/(\alpha-1)`, stable near 1.

    ``log_q`` is a tensor or a number (then a number is returned).

    >>> round(log_alpha_of_inverse(-2.0, 1.5), 4)   # Q-Margin's q_y = e^(-sm) at s = 10, m = 0.2
    3.4366
    """
    if isinstance(log_q, torch.Tensor):
        return torch.expm1((1.0 - alpha) * log_q) / (alpha - 1.0)
    return math.expm1((1.0 - alpha) * log_q) / (alpha - 1.0)


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
    r"""The root of :math:`\sum_j [1 + (\alpha-1) a_j (b_j - \tau)]_+^k = 1` for an integer :math:`k`,
    without iterating over the columns.

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
    bound = theta - log_alpha_of_inverse(log_q, alpha)
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
    return torch.maximum(others_max, theta_y - log_alpha_of_inverse(log_q_target, alpha))


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
            raise LossInputError(
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
        def pick(x):
            return (None if x is None else x[failed])
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
    threshold = tau + row_max - (reach + CERTIFICATE_SLACK)
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
    check_logits_structure(logits)
    maxima = row_maxima(logits)
    InputCheck.of_rows(maxima, None, logits.shape[1], None, []).raise_if_failed()
    log_q = check_log_q(log_q, logits)
    if alpha == 1.0:
        shifted = logits.float() if log_q is None else logits.float() + log_q
        return torch.softmax(shifted, dim=1).to(logits.dtype)
    return _AlphaSoftargmax.apply(logits, alpha, log_q, maxima)


