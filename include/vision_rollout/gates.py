"""The statistical gate: is the canary shown not worse than the baseline, by more than a margin?

Each decisive check runs two one-sided tests against its margin m (non-inferiority):
- pass when the canary is shown better than baseline + m (the upper confidence bound of the
  canary's excess is below m): a canary exactly at the margin passes with probability <= alpha;
- fail when it is shown worse than baseline + m (the lower bound is above m): an equal canary
  fails with probability <= alpha (far less, in fact);
- wait otherwise, stating the minimum detectable effect: too few samples never pass.

Repeated looks: the gate is evaluated at every sensor poke and every stage, ``look`` k of
``looks`` K planned. Each one-sided test spends its alpha over the looks with a Lan-DeMets
spending function (O'Brien-Fleming by default, or Pocock), alpha(k/K) by look k of the stage's
plan; the critical values are the exact group-sequential boundaries for the information each
look saw, each check's own (``Information``: traffic rising through a stage gives its early
looks less than k/K of it; the error checks count the validation replay's steady rounds too),
by recursive numerical integration as in Armitage, McPherson and Rowe 1969 and
Jennison and Turnbull 2000, ch. 19, so the error rates hold over all K looks whatever the
traffic does. Confidence intervals are the matching repeated intervals.

Checks: latency (ratio of trimmed geometric means, Yuen's t on 20%-trimmed log latency; Mann-Whitney U as the rank
check; p95/p99 ratio with distribution-free quantile intervals), errors and OOM (two proportions, Newcombe's
hybrid score interval), accuracy (Tango's score test and interval on paired validation replays,
the exact McNemar p of any drop beside it, and two proportions on live feedback), and the hard
guards. Each decisive check's p-value is its fail test's against the margin (the interval's own
for proportions and for the p95/p99 ratios), below the level it was judged at exactly when the
check fails. The p95/p99 checks can only fail the gate: each fails when its ratio's lower bound
(each arm's quantile bound at half the look's level) is above the tail margin, so a canary whose
quantile lies at the margin fails one at a look with probability at most that look's level, the
latency checks'.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field, fields, replace
from functools import lru_cache
from itertools import pairwise
from typing import Any, NamedTuple, TypeVar

import jsonschema
import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from vision_rollout.spec import DEFAULTS, MAX_LOOKS, RolloutSpec, non_finite

DECISIONS = ("pass", "fail", "wait")
SOURCES = {"live": "Live A/B arms", "replay": "Validation replay"}  # the ``source`` of a sample


# -- group-sequential boundaries -------------------------------------------------------------


def spent(alpha: float, t: float, spending: str) -> float:
    """Cumulative alpha spent at information fraction t (Lan-DeMets)."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "obrien-fleming":
        # sf and isf, not 1 - cdf: 1 - cdf(z) is exactly 0 past z ~ 8.3 (early looks of 18 or more).
        return float(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"unknown spending function {spending!r}: use 'obrien-fleming' or 'pocock'")


def _trapezoid(grid: np.ndarray) -> np.ndarray:
    w = np.full(len(grid), grid[1] - grid[0])
    w[0] = w[-1] = w[0] / 2
    return w


NO_GAIN = 0.01  # a look that adds less than this share of a look's mean information counts as adding it


def information_times(looks: int, information: tuple[float, ...] | None) -> tuple[float, ...]:
    """The score process's times at looks 1..k: the information seen at each, scaled so that the
    k-th lies at k/K (scale is immaterial: the boundaries are in sqrt-time units). ``None``, or no
    information at the k-th look: equal increments, k/K. A look that added (next to) nothing, a
    look interval without traffic, counts as adding ``NO_GAIN`` of a look's mean: the same
    statistic again would need a boundary the recursion's grid cannot carry.

    A look's mean is the largest of looks 1..j's (the information seen at j over j), so that the
    time of look j depends on looks 1..j alone: each look's boundary, solved at its own look, is
    the one the later looks' recursions assume. The mean at the k-th look (the last's over k)
    moved the earlier looks' times as traffic came (a stall of looks 2 to 5 at 100 samples, then
    5,000 a look: look 2's Pocock boundary 0.26 apart as judged and as the later looks took it),
    so the looks judged were not the procedure whose error rate the recursion holds. Looks
    before the first with any information take the first's mean (their times in the ratios of
    equal increments, as they were judged)."""
    if information is None or not information or information[-1] <= 0:
        return tuple(j / looks for j in range(1, (len(information) if information else looks) + 1))
    k = len(information)
    first = next(j for j, seen in enumerate(information, 1) if seen > 0)
    unit = float(information[first - 1]) / first
    times, last = [], 0.0
    for j, seen in enumerate(information, 1):
        unit = max(unit, float(seen) / j)  # never shrinks: the floor of each look is fixed at its own
        last = max(float(seen), last + NO_GAIN * unit)
        times.append(last)
    return tuple(t / times[-1] * k / looks for t in times)


@lru_cache(maxsize=256)
def boundaries(
    alpha: float,
    looks: int,
    spending: str = "obrien-fleming",
    information: tuple[float, ...] | None = None,
    grid: int = 1201,
) -> tuple[float, ...]:
    """Z critical values c_1..c_k of a one-sided test whose alpha is spent over K planned looks.

    The score process S(t) is Brownian motion under H0, in the time of the information seen:
    at look k the test rejects when S(t_k) >= c_k sqrt(t_k). The density of S on the continuation
    region is carried from look to look on a grid and each c_k solves P(first crossing at k) =
    alpha(k/K) - alpha((k-1)/K).

    ``information``: what looks 1..k saw (any unit, e.g. samples per arm: ``information``), c_1..c_k
    returned; ``None`` (all K) for equal increments. The alpha is spent by the plan's fraction k/K
    and the boundaries are computed at the information seen (Lan and DeMets 1989, "Group
    sequential procedures: calendar versus information time"): a stage's plan is seconds, not samples (no
    traffic forecast says what its last look will hold), and the error rate is exact whatever the
    traffic does, because each c_k is solved under the process's true correlations, sqrt(n_j /
    n_k). Boundaries computed at k/K for looks whose information was not k/K of the last's (traffic
    rising from 1x at the first look to 3x at the last) passed a canary at the margin with 0.056
    at alpha 0.05. A look that spent nothing (its c infinite) leaves its share to the next.
    A stage's record keeps the levels reckoned from these (``Reckoning``): a change to how they
    are computed bumps ``RECKONED_VERSION``.
    """
    if looks < 1:
        raise ValueError("looks must be >= 1")
    if information is not None and not 1 <= len(information) <= looks:
        raise ValueError(f"information of 1..{looks} looks, got {len(information)}")
    times = information_times(looks, information)
    out: list[float] = []
    prev_t = used = 0.0
    s_grid: np.ndarray | None = None
    dens: np.ndarray | None = None
    for k, t in enumerate(times):
        increment = spent(alpha, (k + 1) / looks, spending) - used
        dt = t - prev_t
        if k == 0:
            c = float(stats.norm.isf(increment)) if increment > 0 else math.inf
        else:
            assert s_grid is not None
            assert dens is not None
            weights = dens * _trapezoid(s_grid)

            def crossing(b: float, s_grid: np.ndarray = s_grid, weights: np.ndarray = weights, dt: float = dt) -> float:
                # ndtr(-x) is norm.sf(x), without scipy.stats' overhead per call.
                return float(np.sum(weights * special.ndtr((s_grid - b) / math.sqrt(dt))))

            if increment <= 0:
                c = math.inf
            else:
                hi = 40.0 * math.sqrt(t)

                def excess(b: float, target: float = increment) -> float:
                    return crossing(b) - target

                b = optimize.brentq(excess, -8.0 * math.sqrt(t), hi, xtol=1e-10)
                c = b / math.sqrt(t)
        out.append(c)
        used += increment if math.isfinite(c) else 0.0
        upper = c * math.sqrt(t) if math.isfinite(c) else 8.0 * math.sqrt(t)
        new_grid = np.linspace(-8.0 * math.sqrt(t), upper, grid)
        if k == 0:
            dens = stats.norm.pdf(new_grid / math.sqrt(t)) / math.sqrt(t)
        else:
            assert s_grid is not None
            assert dens is not None
            w = dens * _trapezoid(s_grid)
            # The normal density of each step, written out in place (scipy's pdf over the grid x grid
            # took most of the time).
            kernel = np.subtract.outer(new_grid, s_grid)
            np.square(kernel, out=kernel)
            kernel *= -0.5 / dt
            np.exp(kernel, out=kernel)
            dens = (kernel @ w) / math.sqrt(2 * math.pi * dt)
        s_grid = new_grid
        prev_t = t
    return tuple(out)


T = TypeVar("T")

# The version of the methods whose values a ``Reckoning`` keeps, in every key. Bump it whenever a
# reckoned value's method changes: ``boundaries``' recursion or its grid, ``information_times``
# (``NO_GAIN``), ``spent``, ``nominal_alpha``, ``engine.need_n``'s reckoning (``_reckoned_need``,
# ``steady_information``). A stage's record outlives a deploy mid-stage, and a value the code
# before reckoned, kept by the same inputs, would be taken for this code's.
RECKONED_VERSION = 1


class Reckoning:
    """What a stage's judgement reckoned at some cost (a look's level, ``nominal_alpha``: the
    boundaries of its looks, up to a few tenths of a second of CPU each; a waiting look's need,
    ``engine.need_n``: about a second), by a digest of all each was reckoned from, kept for the
    stage's next judgement in ``known``: the DAG's pokes each run in a process of their own, on
    any worker, so the stage's record in the run folder keeps it (``attempts.Attempt.reckoned``),
    and each poke judges the same looks again. A value of the same inputs is taken from
    ``known``, else reckoned; once the judgement takes or reckons one, ``known`` holds those it
    took or reckoned, no others (at most ``MAX_RECKONED``). Each key holds ``RECKONED_VERSION``:
    a value reckoned by another version of the methods is reckoned again. The record's check
    takes a level or a need under any key (digests say nothing of their kind): a kept value that
    is not of its key's kind (``fits``: a damaged record's) is reckoned again, not judged with."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known
        self.before: dict[str, Any] | None = None  # ``known`` as the judgement found it

    def __call__(self, read: list[Any], reckon: Callable[[], T], fits: Callable[[Any], bool]) -> T:
        """The value of ``reckon()``, whose inputs are all in ``read`` (JSON), taken (when it
        ``fits``: of what ``reckon`` returns) or reckoned."""
        if self.before is None:
            self.before = dict(self.known)
            self.known.clear()
        key = hashlib.sha256(json.dumps([RECKONED_VERSION, read]).encode()).hexdigest()[:32]
        if key not in self.known:
            kept = self.before.get(key)
            self.known[key] = kept if key in self.before and fits(kept) else reckon()
        value: T = self.known[key]
        return value


def nominal_alpha(
    alpha: float,
    look: int,
    looks: int,
    spending: str = "obrien-fleming",
    information: tuple[float, ...] | None = None,
    reckoning: Reckoning | None = None,
) -> float:
    """The one-sided level at which look k of K is judged; ``information``: what looks 1..k saw
    (``boundaries``), None for equal increments. ``reckoning``: where a level of the same
    inputs, reckoned before, is taken from (``Reckoning``: the same float)."""
    if not 1 <= look <= looks:
        raise ValueError(f"look must be in 1..looks, got look={look}, looks={looks}")
    if information is not None and len(information) != look:
        raise ValueError(f"information of looks 1..{look}, got {len(information)}")

    def level() -> float:
        c = boundaries(alpha, looks, spending, information)[look - 1]
        return float(stats.norm.sf(c)) if math.isfinite(c) else 0.0

    if reckoning is None:
        return level()
    seen = None if information is None else [float(i) for i in information]
    return reckoning(["nominal_alpha", alpha, look, looks, spending, seen], level, is_level)


def is_level(value: Any) -> bool:
    """Whether ``value`` is a level ``nominal_alpha`` reckons: a float in [0, 1) (0: a look
    that spent nothing)."""
    return isinstance(value, float) and 0 <= value < 1


# -- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """The gate's thresholds, as ``evaluate_gate`` reads them; a rollout builds it from its
    ``RolloutSpec`` (``from_spec``), whose defaults these are. Margins are relative for latency
    and absolute (differences of proportions) for errors and accuracy; the guards' limits are hard.
    """

    alpha: float = DEFAULTS.alpha
    latency_margin: float = DEFAULTS.latency_margin  # relative, on the geometric mean
    tail_margin: float = DEFAULTS.tail_margin  # relative, on p95/p99: beyond it the canary fails
    error_margin: float = DEFAULTS.error_margin  # absolute
    accuracy_margin: float = DEFAULTS.accuracy_margin  # absolute
    min_samples: int = DEFAULTS.min_samples  # per arm
    spending: str = DEFAULTS.spending
    p99_ms_max: float = DEFAULTS.p99_ms_max
    p99_breach_seconds: float = DEFAULTS.p99_breach_seconds
    accuracy_drop_max: float = DEFAULTS.accuracy_drop_max
    shadow_error_rate_max: float = DEFAULTS.shadow_error_rate_max
    restarts_max: int = DEFAULTS.restarts_max
    power: float = 0.8  # for the minimum detectable effect (reported, never decides)

    @classmethod
    def from_spec(cls, spec: RolloutSpec, **overrides: Any) -> GateConfig:
        """The gate of a rollout: every threshold from its spec (``overrides`` for a study)."""
        return cls.from_any({f.name: getattr(spec, f.name) for f in fields(cls) if hasattr(spec, f.name)} | overrides)

    @classmethod
    def from_any(cls, config: GateConfig | dict[str, Any] | None) -> GateConfig:
        """A config as given, or from a dict checked against the limits of ``RolloutSpec``'s
        fields of the same names (its JSON schema): ValueError naming the key."""
        if config is None:
            return cls()
        if isinstance(config, GateConfig):
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown gate config key(s) {unknown}; known: {sorted(known)}")
        if (key := non_finite(config)) is not None:  # NaN passes every schema bound (a guard off)
            raise ValueError(f"gate config {key}: {config[key]} is not a finite number")
        spec_fields = RolloutSpec.json_schema()["properties"]
        power = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
        schema = {"type": "object", "properties": {k: spec_fields.get(k, power) for k in known}}
        try:
            jsonschema.validate(config, schema)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            raise ValueError(f"gate config {where}: {exc.message[:200]}") from None
        return cls(**config)


@dataclass(frozen=True)
class Check:
    """One statistical check of a look, as the report shows it.

    ``decision``: pass, fail or wait for a check that can hold the gate (``blocks_pass``), info
    or fail for one that can only fail it. The numbers are in the check's own unit, named by
    its ``sentence``: ``effect``, its interval ``ci``, ``margin`` and ``mde`` (the smallest effect
    these samples resolve) are a relative change for latency (0.05 = +5%), a difference of
    proportions for errors and accuracy (0.001 = 0.1 pp), milliseconds for the P99 guard, a count
    for the restart guard.
    ``statistic`` is the test's (t, U, Tango's score); ``p_value`` one-sided, toward harm: the fail
    test's against the margin, below ``level`` exactly when the check fails (a decisive check).
    ``level``: the one-sided level this look judged the check at, its boundary at its own
    information (``check_information``): the verdict's ``nominal_alpha`` is the latency checks';
    None where the check has none (a guard) or its record predates it.
    Everything after ``method`` is passed by keyword.
    """

    name: str
    decision: str  # pass | fail | wait | info
    sentence: str
    method: str
    _: KW_ONLY
    n_baseline: int = 0
    n_canary: int = 0
    statistic: float | None = None
    p_value: float | None = None
    level: float | None = None
    effect: float | None = None
    ci: tuple[float, float] | None = None
    margin: float | None = None
    mde: float | None = None
    blocks_pass: bool = True  # must pass for the gate to pass (else it can only fail it)

    @property
    def held(self) -> bool:
        """The live accuracy check holds the stage: one tenant's labels decide it (``live_accuracy_check``)."""
        return self.name == "accuracy_live" and self.decision == "wait" and self.blocks_pass

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = [x if math.isfinite(x) else None for x in self.ci] if self.ci else None  # JSON: no infinities
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _interval(raw: list[float | None] | None) -> tuple[float, float] | None:
    """A JSON interval back: null bounds were infinities (``Check.to_dict``)."""
    if not raw:
        return None
    return (-math.inf if raw[0] is None else raw[0], math.inf if raw[1] is None else raw[1])


@dataclass(frozen=True)
class Verdict:
    """A look's decision: pass, fail or wait, with every check behind it and the look's place in
    the stage's group-sequential plan (``look`` of ``looks``, the overall ``alpha`` and this
    look's ``nominal_alpha`` from the ``spending`` function: the latency checks' level, each
    check's own its ``level``). ``summary`` leads the report.
    """

    decision: str
    checks: tuple[Check, ...]
    look: int
    looks: int
    alpha: float
    nominal_alpha: float
    spending: str
    summary: str = field(default="")

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.decision == "fail"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        """Back from ``to_dict`` (an XCom value, a JSON report). A stage that ended without a look
        judged left a verdict of its decision and summary only: no look (0), no level (0)."""
        names = {f.name for f in fields(Check)}
        checks = tuple(
            Check(
                **{
                    **{k: v for k, v in c.items() if k in names},
                    "ci": _interval(c.get("ci")),
                }
            )
            for c in d.get("checks") or ()
        )
        return cls(
            d["decision"],
            checks,
            d.get("look", 0),
            d.get("looks", 0),
            d.get("alpha", DEFAULTS.alpha),
            d.get("nominal_alpha", 0.0),
            d.get("spending", DEFAULTS.spending),
            d.get("summary", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "summary": self.summary,
            "look": self.look,
            "looks": self.looks,
            "alpha": self.alpha,
            "nominal_alpha": self.nominal_alpha,
            "spending": self.spending,
            "checks": [c.to_dict() for c in self.checks],
        }


# -- checks ----------------------------------------------------------------------------------


def _decide(lower: float, upper: float, margin: float) -> str:
    if upper < margin:
        return "pass"
    if lower > margin:
        return "fail"
    return "wait"


def limit_percent(limit: float) -> str:
    """A limit (a share) as a percentage, as precise as it was set: 0.995 is 99.5, not 100."""
    return f"{100 * limit:.10g}"


def percent_beside(x: float, limit: float, decimals: int = 2) -> str:
    """A share ``x`` as a percentage with ``decimals`` decimals, or more where fewer would show it
    on the limit (``limit_percent``) or across it: an upper bound of 0.899994 beside a 90% limit
    reads 89.9994, not 90.00."""
    shown = float(limit_percent(limit))
    text = f"{100 * x:.{decimals}f}"
    for d in range(decimals, 12):
        text = f"{100 * x:.{d}f}"
        if (float(text) < shown) == (x < limit) and (float(text) > shown) == (x > limit):
            break
    return text


def _signed(x: float, beside: float | None = None) -> str:
    """A difference in percent (or pp) with its sign; ``beside`` a margin, as ``percent_beside``."""
    text = f"{100 * x:.2f}" if beside is None else percent_beside(x, beside)
    return text if text.startswith("-") else "+" + text


def _pct(x: float, beside: float | None = None) -> str:
    return _signed(x, beside) + "%"


def _margin(m: float) -> str:
    return f"+{limit_percent(m)}%"


TRIM = 0.2  # the share of each arm's log latencies trimmed from either end (Wilcox's default)


def trimmed_mean(x: np.ndarray, trim: float = TRIM) -> tuple[float, float, int]:
    """Yuen's (1974) trimmed mean of ``x``, the squared standard error of it from the winsorized
    variance, and the number of values kept (``h``, whose h - 1 are its degrees of freedom)."""
    n = len(x)
    if n < 2:
        raise ValueError(f"a trimmed mean's standard error needs at least 2 values, got {n}")
    g = int(trim * n)
    s = np.partition(x, (g, n - g - 1))  # the order statistics g and n-g-1 in place, in linear time
    kept = s[g : n - g]
    winsorized = np.clip(s, s[g], s[n - g - 1])
    h = len(kept)
    spread = float(winsorized.var(ddof=1))
    if spread <= 1e-12 * float(s.var(ddof=1)):  # (its middle tied, its values not: the plain mean's spread)
        return float(kept.mean()), float(s.var(ddof=1)) / n, h
    return float(kept.mean()), (n - 1) * spread / (h * (h - 1)), h


def latency_check(base: np.ndarray, canary: np.ndarray, cfg: GateConfig, level: float) -> Check:
    """Non-inferiority of the canary's trimmed geometric-mean latency: Yuen's test on 20%-trimmed
    means of log latency. Welch's t on the plain means passed a canary at the margin 3x too often
    (alpha 0.05: 0.14) when the canary arm was the small one and latency had a heavy right tail:
    the small arm's mean is skewed and so is its t. Trimming each arm's slowest (and fastest)
    20% makes the means near-normal whatever the tail; where the canary is the baseline scaled,
    the trimmed means differ by the log ratio exactly, and the p95/p99 checks judge the tail."""
    tb, vb, hb = trimmed_mean(np.log(base))
    tc, vc, hc = trimmed_mean(np.log(canary))
    nb, nc = len(base), len(canary)
    se = math.sqrt(vb + vc)
    delta = tc - tb
    df = (vb + vc) ** 2 / (vb**2 / (hb - 1) + vc**2 / (hc - 1)) if se > 0 else float(hb + hc - 2)
    crit = float(stats.t.isf(level, df))
    m = math.log1p(cfg.latency_margin)
    lower, upper = delta - crit * se, delta + crit * se
    # Toward harm, as the fail test (lower bound above the margin) reads it: below the look's level
    # exactly when the canary is shown slower than the margin.
    p_harm = float(stats.t.sf((delta - m) / se, df)) if se > 0 else float(delta <= m)
    mde = (crit + float(stats.norm.ppf(cfg.power))) * se
    decision = _decide(lower, upper, m)
    ratio, ci = math.expm1(delta), (math.expm1(lower), math.expm1(upper))
    interval = f"{_pct(ci[0], cfg.latency_margin)} to {_pct(ci[1], cfg.latency_margin)}"
    text = {
        "pass": f"Canary trimmed geometric-mean latency is {_pct(ratio)} vs baseline (interval {interval}), "
        f"shown within the {_margin(cfg.latency_margin)} margin.",
        "fail": f"Canary trimmed geometric-mean latency is {_pct(ratio)} vs baseline (interval {interval}): "
        f"worse than the {_margin(cfg.latency_margin)} margin.",
        "wait": f"Canary trimmed geometric-mean latency is {_pct(ratio)} vs baseline, but the interval "
        f"({interval}) still straddles the {_margin(cfg.latency_margin)} margin; "
        f"these samples resolve differences of about {_pct(math.expm1(mde))}.",
    }[decision]
    return Check(
        "latency_geomean",
        decision,
        text,
        "Yuen's t on 20%-trimmed means of log latency (ratio of trimmed geometric means), "
        "repeated one-sided interval at the look's nominal level",
        n_baseline=nb,
        n_canary=nc,
        statistic=(delta - m) / se if se else None,
        p_value=p_harm,
        level=level,
        effect=ratio,
        ci=ci,
        margin=cfg.latency_margin,
        mde=math.expm1(mde),
    )


def rank_check(base: np.ndarray, canary: np.ndarray, level: float) -> Check:
    res = stats.mannwhitneyu(canary, base, alternative="greater")
    prob = float(res.statistic) / (len(base) * len(canary))
    verb = "slower" if res.pvalue < level else "not shown slower"
    return Check(
        "latency_rank",
        "info",
        f"Mann-Whitney U: a canary request is slower than a baseline one with "
        f"probability {prob:.3f}; the canary is {verb} (one-sided p={res.pvalue:.3g}, level {level:.3g}).",
        "Mann-Whitney U, one-sided (canary stochastically slower)",
        n_baseline=len(base),
        n_canary=len(canary),
        statistic=float(res.statistic),
        p_value=float(res.pvalue),
        level=level,
        effect=prob,
        blocks_pass=False,
    )


def _order_bounds(xs: np.ndarray, q: float, level: Any) -> tuple[np.ndarray, np.ndarray]:
    """``quantile_interval`` of sorted ``xs`` at each of ``level`` (a number or an array)."""
    n = len(xs)
    lo = stats.binom.ppf(level, n, q).astype(int)  # P(Bin(n, q) < lo) <= level: x(lo) is below the quantile
    hi = stats.binom.isf(level, n, q).astype(int) + 1
    # Too few samples for a bound: the widest one.
    lower = np.where(lo >= 1, xs[np.clip(lo - 1, 0, n - 1)], 0.0)
    upper = np.where(hi <= n, xs[np.clip(hi - 1, 0, n - 1)], math.inf)
    return lower, upper


def quantile_interval(x: np.ndarray, q: float, level: float) -> tuple[float, float]:
    """Distribution-free interval of the q-quantile: order statistics at binomial ranks, each
    side missing with probability at most ``level``."""
    lower, upper = _order_bounds(np.sort(x), q, level)
    return float(lower), float(upper)


def _tail_lower(base: np.ndarray, canary: np.ndarray, q: float, level: Any) -> np.ndarray:
    """The lower bound of the ratio of the canary's q-quantile to the baseline's, minus 1, at each
    of ``level`` (arms sorted): the canary's lower bound over the baseline's upper one, each at
    half the level (Bonferroni: both hold with probability at least 1 - level)."""
    lc, _ = _order_bounds(canary, q, np.asarray(level) / 2)
    _, hb = _order_bounds(base, q, np.asarray(level) / 2)
    return lc / hb - 1


TAIL_P_FLOOR = 1e-100  # the least p-value ``tail_p`` tells: "at most this"


def tail_p(base: np.ndarray, canary: np.ndarray, q: float, margin: float) -> float:
    """The one-sided p-value of "the canary's q-quantile exceeds the baseline's by more than
    ``margin``" that inverts ``tail_check``'s rule as it runs: the least level at which the
    ratio's lower bound (``_tail_lower``) is above the margin (it rises with the level), found
    on a log grid to 1e-10 of itself and rounded up, so that the check fails exactly when p is
    below its level (a level above ``TAIL_P_FLOOR``); 1 where no level shows it, the floor where
    that level shows it already. (The rule's own ranks, not the binomial's exact ones: scipy's isf saturates below
    about 1e-17, where the baseline then has no upper bound; its ppf warns below about 1e-295.)"""
    xb, xc = np.sort(base), np.sort(canary)
    if not _tail_lower(xb, xc, q, 1.0) > margin:
        return 1.0
    lo, hi = math.log10(TAIL_P_FLOOR), 0.0  # log10 of levels at which it does not fail, and does
    if _tail_lower(xb, xc, q, TAIL_P_FLOOR) > margin:
        return TAIL_P_FLOOR
    for _ in range(7):  # each round 64 times finer: 100 decades to under 1e-10 of one
        grid = np.linspace(lo, hi, 65)
        first = int(np.argmax(_tail_lower(xb, xc, q, 10.0**grid) > margin))  # (the last fails, the first not)
        lo, hi = grid[first - 1], grid[first]
    return float(10.0**hi)


def tail_check(base: np.ndarray, canary: np.ndarray, q: float, cfg: GateConfig, level: float) -> Check:
    """The canary's q-quantile against the baseline's, failing beyond ``tail_margin``: the
    ratio's interval is each arm's distribution-free quantile interval at half the look's level
    (Bonferroni), so a canary whose quantile lies at the margin fails with probability at most
    that level (each look judged at the latency checks', its boundary at their information).
    Can only fail the gate; its p-value is the fail test's (``tail_p``), below ``level`` exactly
    when it fails."""
    qb, qc = float(np.quantile(base, q)), float(np.quantile(canary, q))
    lb, hb = quantile_interval(base, q, level / 2)
    lc, hc = quantile_interval(canary, q, level / 2)
    # No lower bound for the baseline's quantile (too few samples at this look's level): no upper
    # bound for the ratio.
    lower, upper = lc / hb - 1, (hc / lb - 1 if lb > 0 else math.inf)
    effect = qc / qb - 1
    p_harm = tail_p(base, canary, q, cfg.tail_margin)
    pq = f"p{round(q * 100)}"
    fail = lower > cfg.tail_margin
    text = (
        f"{pq}: canary {qc:.2f} ms vs baseline {qb:.2f} ms ({_pct(effect)}, interval "
        f"{_pct(lower, cfg.tail_margin)} to {_pct(upper, cfg.tail_margin)})"
        + (
            f": worse than the {_margin(cfg.tail_margin)} tail margin"
            if fail
            else f"; the check fails only beyond the {_margin(cfg.tail_margin)} tail margin"
        )
        + f"; one-sided p that the canary's {pq} is worse than the margin: {p_harm:.3g} (this look's level "
        f"{level:.3g}, each quantile's bound at half of it)."
    )
    return Check(
        f"latency_{pq}",
        "fail" if fail else "info",
        text,
        "distribution-free intervals of each quantile (order statistics at binomial ranks, each at half the "
        "look's level), combined into a conservative interval of the ratio; fails when its lower bound is "
        "above the tail margin; one-sided p of that test, from the same intervals",
        n_baseline=len(base),
        n_canary=len(canary),
        p_value=p_harm,
        level=level,
        effect=effect,
        ci=(lower, upper),
        margin=cfg.tail_margin,
        blocks_pass=False,
    )


def _wilson(x: float, n: float, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(x1: float, n1: float, x2: float, n2: float, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p2 - p1 (method 10, 1998)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = _wilson(x1, n1, z)
    l2, u2 = _wilson(x2, n2, z)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def newcombe_p(x1: float, n1: float, x2: float, n2: float, margin: float, higher: bool) -> float:
    """The one-sided p-value of "p2 - p1 exceeds ``margin``" (``higher``; else "falls below it")
    that inverts Newcombe's interval: the level at which its bound on that side reaches the
    margin, so that the bound is beyond the margin exactly when p is below the level. Above
    0.5 when the estimate is on the other side of the margin (1 - the opposite test's p)."""
    d = x2 / n2 - x1 / n1
    sign = 1.0 if higher else -1.0

    def beyond(z: float) -> float:  # how far the interval's bound on that side lies past the margin
        lo, hi = newcombe(x1, n1, x2, n2, z)
        return sign * ((lo if higher else hi) - margin)

    def root(f: Any) -> float:
        if f(0.0) <= 0:
            return 0.0
        if f(40.0) > 0:
            return 40.0
        return float(optimize.brentq(f, 0.0, 40.0, xtol=1e-10))

    if sign * (d - margin) > 0:
        return float(stats.norm.sf(root(beyond)))
    if d == margin:
        return 0.5

    def short(z: float) -> float:  # how far the other bound lies short of the margin
        lo, hi = newcombe(x1, n1, x2, n2, z)
        return sign * (margin - (hi if higher else lo))

    return float(stats.norm.cdf(root(short)))


def proportion_check(
    name: str,
    what: str,
    worse_is_higher: bool,
    xb: int,
    nb: int,
    xc: int,
    nc: int,
    margin: float,
    cfg: GateConfig,
    level: float,
    blocks_pass: bool = True,
    design: tuple[float, float] = (1.0, 1.0),
) -> Check:
    """Two proportions: the canary's excess (errors) or shortfall (accuracy) against a margin.

    ``design``: the design effect of each arm's count (baseline, canary; ``design_effect``):
    correlated items count as the independent ones they are worth (Rao and Scott 1992: each
    count and its total divided by it), for the interval and the p-value alike."""
    z = float(stats.norm.isf(level))
    rate_b, rate_c = xb / nb, xc / nc
    eb, en_b, ec, en_c = xb / design[0], nb / design[0], xc / design[1], nc / design[1]
    lo, hi = newcombe(eb, en_b, ec, en_c, z)  # canary - baseline
    excess, (lower, upper) = ((rate_c - rate_b), (lo, hi)) if worse_is_higher else ((rate_b - rate_c), (-hi, -lo))
    p_harm = newcombe_p(eb, en_b, ec, en_c, margin if worse_is_higher else -margin, worse_is_higher)
    method = "Newcombe hybrid score interval; one-sided p of the margin's test, from the same interval"
    if design != (1.0, 1.0):
        method += "; counts divided by each arm's design effect (Rao-Scott, items of one request correlated)"
    decision = _decide(lower, upper, margin)
    if not blocks_pass and decision == "pass":
        decision = "info"
    half = (upper - lower) / 2
    mde = half * (1 + float(stats.norm.ppf(cfg.power)) / z)
    verdict = {
        "pass": f"shown within the {limit_percent(margin)} pp margin",
        "fail": f"worse than the {limit_percent(margin)} pp margin",
        "wait": f"not yet resolved against the {limit_percent(margin)} pp margin (resolves about {100 * mde:.2f} pp)",
        "info": "reported; this check can only fail the gate",
    }[decision]
    text = (
        f"{what}: canary {100 * rate_c:.2f}% ({xc}/{nc}) vs baseline {100 * rate_b:.2f}% ({xb}/{nb}), "
        f"{'excess' if worse_is_higher else 'drop'} {_signed(excess, margin)} pp (interval "
        f"{_signed(lower, margin)} to {_signed(upper, margin)} pp): {verdict}; one-sided p that the canary is worse "
        f"than the {limit_percent(margin)} pp margin: {p_harm:.3g} (this look's level {level:.3g})."
    )
    if design != (1.0, 1.0):
        text += (
            f" Items of one request are correlated: they count as {en_c:.0f} (canary) and {en_b:.0f} (baseline) "
            f"independent ones (design effects {design[1]:.2f} and {design[0]:.2f})."
        )
    return Check(
        name,
        decision,
        text,
        method,
        n_baseline=nb,
        n_canary=nc,
        p_value=p_harm,
        level=level,
        effect=excess,
        ci=(lower, upper),
        margin=margin,
        mde=mde,
        blocks_pass=blocks_pass,
    )


def cluster_sums(correct: np.ndarray, items: np.ndarray) -> np.ndarray:
    """An arm's clusters (``correct`` of ``items`` in each: a request's images) as the sums the
    design effect reads: clusters, correct, items, and the sums of correct^2, correct x items and
    items^2 (sums of two parts add up: a part's are taken away by subtraction)."""
    return np.array(
        [len(items), correct.sum(), items.sum(), (correct**2).sum(), (correct * items).sum(), (items**2).sum()],
        dtype=float,
    )


def design_effect(*arms: np.ndarray) -> float:
    """How many times the variance of a difference of proportions exceeds the binomial one when
    the items come in clusters (each arm's ``cluster_sums``): the ratio of the arms' cluster-
    robust variances to their binomial ones, summed over the arms (Rao and Scott 1992, one
    design effect for the difference: an arm's own estimate from a few dozen requests missed its
    rare bad ones), kept between 1 (independent items) and the mean cluster size (a cluster's
    items all alike: the cluster is the unit); the mean cluster size where the data cannot say
    (every item alike)."""
    robust = binomial = n = clusters = 0.0
    for count, correct, items, cc, ci, ii in arms:
        n, clusters = n + items, clusters + count
        if count < 2 or items <= 0:
            continue
        p = correct / items
        robust += count / (count - 1) * max(cc - 2 * p * ci + p * p * ii, 0.0) / items**2
        binomial += p * (1 - p) / items
    largest = n / clusters if clusters else 1.0
    if binomial <= 0:
        return largest
    return min(max(1.0, robust / binomial), largest)


def live_accuracy_check(labelled: pd.DataFrame, cfg: GateConfig, level: float) -> Check:
    """Two proportions on the live feedback labels, each arm's counts divided by the design effect
    of its requests (``cluster``: the rows of one request; a row without one is a request of its
    own): the items of one request (one client's images, of one kind, labelled by one hand) are
    no independent samples, and counting them as such understated the variance (an equal canary
    failed at 0.05 in 13 to 42% of rollouts with requests of 8 images).

    No one tenant's labels (``labelled_by``, the tenant that sent each label; none named is one
    source) decide: a client holds the token of each answer it got, so one client could label
    the canary's answers wrong (rolling a good canary back) or the baseline's (hiding a worse
    one), and a moderate lie is no outlier: it reads as a canary worse on that tenant's images.
    A decision on all the labels stands where it is the decision without each tenant's labels
    in turn (fail, or not); where one tenant's labels change it, the check holds the stage (a
    "wait" that blocks a pass: the stage ends undecided, and the run rolls back, unless a later
    look decides without them) and names the tenant, its drop and the others'. So one tenant can
    hold a rollout, never fail a canary the others do not show worse nor pass one they do; and
    honest tenants of a canary 2 pp worse, each too few alone to show it, hold it (on main they
    let it through: the check failed only where it failed without each tenant, and never held).
    Labels from a single source decide alone: the log cannot tell its senders apart."""
    unit = pd.factorize(labelled["cluster"])[0] if "cluster" in labelled else np.full(len(labelled), -1)
    alone = unit < 0  # no request named: a request of its own
    unit[alone] = unit.max(initial=-1) + 1 + np.arange(int(alone.sum()))
    source = np.full(len(labelled), None, dtype=object)  # (none named, or "": one source of its own)
    if "labelled_by" in labelled:
        named = (labelled["labelled_by"].notna() & (labelled["labelled_by"] != "")).to_numpy()
        source[named] = labelled["labelled_by"][named].astype(str).to_numpy(object)
    # A request's rows (arm and unit), in the order each first appears: its label sums, its source
    # that of its first row. Arrays, not a groupby: a simulation calls this thousands of times.
    canary = (labelled["arm"].to_numpy(object) == "canary").astype(np.intp)
    group = pd.factorize(unit * 2 + canary)[0]
    first = np.unique(group, return_index=True)[1]
    correct = np.bincount(group, labelled["correct"].to_numpy(float))
    items = np.bincount(group).astype(float)
    in_source, sources = pd.factorize(source[first], use_na_sentinel=False)
    cell = canary[first] * len(sources) + in_source  # arm by source
    columns = (np.ones_like(items), correct, items, correct**2, correct * items, items**2)  # as cluster_sums
    sums = np.stack([np.bincount(cell, c, minlength=2 * len(sources)) for c in columns], axis=1)
    base, cand = sums.reshape(2, len(sources), len(columns))
    total_b, total_c = base.sum(axis=0), cand.sum(axis=0)
    effect = design_effect(total_b, total_c)
    check = proportion_check(
        "accuracy_live",
        "Live accuracy from feedback",
        False,
        int(total_b[1]),
        int(total_b[2]),
        int(total_c[1]),
        int(total_c[2]),
        cfg.accuracy_margin,
        cfg,
        level,
        blocks_pass=False,
        design=(effect, effect),
    )
    if len(sources) < 2:
        return check
    failed, z = check.decision == "fail", float(stats.norm.isf(level))
    decides = [i for i in range(len(sources)) if _fails(total_b - base[i], total_c - cand[i], z, cfg) != failed]
    if not decides:
        return check
    i = max(decides, key=lambda j: base[j, 2] + cand[j, 2])  # the one of the most labels
    rest_b, rest_c = total_b - base[i], total_c - cand[i]
    drop, others = _drop(base[i], cand[i]), _drop(rest_b, rest_c)
    them = "the other" if len(sources) == 2 else "the others"
    if drop is None:
        saw = f"labelled only the {'canary' if cand[i, 2] else 'baseline'}'s answers"
    elif others is None:
        saw = f"saw a drop of {100 * drop:+.2f} pp where {them} labelled only the {'canary' if rest_c[2] else 'baseline'}'s answers"
    else:
        saw = f"saw a drop of {100 * drop:+.2f} pp where {them} saw {100 * others:+.2f} pp"
    more = "" if len(decides) == 1 else f" (as without the labels of {len(decides) - 1} other tenant(s) in turn)"
    who = "labels of no tenant" if pd.isna(sources[i]) else f"tenant {str(sources[i])[:40]!r}"
    share = (base[i, 2] + cand[i, 2]) / (total_b[2] + total_c[2])  # (of both arms': one arm's only may decide)
    shown = f"{100 * share:.0f}%"  # (never a rounded 0% or 100%: 99.8% is not all of them)
    shown = "under 1%" if shown == "0%" and share else "over 99%" if shown == "100%" and share < 1 else shown
    rate_b, rate_c = total_b[1] / total_b[2], total_c[1] / total_c[2]
    return replace(  # (no estimate to resolve, no test decided: more labels do not say which tenant is right)
        check,
        decision="wait",
        blocks_pass=True,
        ci=None,
        mde=None,
        p_value=None,
        sentence=f"Live accuracy from feedback: canary {100 * rate_c:.2f}% ({int(total_c[1])}/{int(total_c[2])}) vs "
        f"baseline {100 * rate_b:.2f}% ({int(total_b[1])}/{int(total_b[2])}), drop {_signed(rate_b - rate_c, cfg.accuracy_margin)} pp: "
        f"held, nothing passes: {who} ({shown} of the labels) {saw}, and without its labels the canary "
        f"{'is not' if failed else 'is'} shown worse than the {limit_percent(cfg.accuracy_margin)} pp margin at this look's "
        f"level {level:.3g}{more}. One tenant's labels do not decide (wrong labels sent, or a canary worse on that "
        "tenant's images only): unless a later look decides without them, the stage ends undecided and the run rolls "
        "back. Check that tenant's labels (its feedback key or gateway identity can be revoked) and trigger the rollout "
        "again.",
    )


def _fails(base: np.ndarray, cand: np.ndarray, z: float, cfg: GateConfig) -> bool:
    """Whether the live check on these ``cluster_sums`` fails (its decision, without its p-value):
    an arm without labels fails nothing."""
    if base[2] <= 0 or cand[2] <= 0:
        return False
    e = design_effect(base, cand)
    _, hi = newcombe(base[1] / e, base[2] / e, cand[1] / e, cand[2] / e, z)  # canary - baseline
    return -hi > cfg.accuracy_margin  # the drop's lower bound above the margin


def _drop(base: np.ndarray, cand: np.ndarray) -> float | None:
    """The accuracy drop (baseline - canary) of a part's ``cluster_sums``; None without both arms."""
    return None if base[2] <= 0 or cand[2] <= 0 else base[1] / base[2] - cand[1] / cand[2]


def tango_z(b: int, c: int, n: int, d: float) -> float:
    """Tango's score statistic (1998) for d = p10 - p01 on n pairs, b of them only the baseline
    right and c only the canary: (b - c - n d) over its standard error at the maximum-likelihood
    cells under p10 - p01 = d. Negative: the drop is shown below d."""
    if d < 0:  # the same test with the arms' roles swapped
        return -tango_z(c, b, n, -d)
    w = -b - c + (2 * n - b + c) * d
    p01 = (-w + math.sqrt(w * w + 8 * n * c * d * (1 - d))) / (4 * n)
    var = n * (2 * p01 + d - d * d)
    num = b - c - n * d
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, z: float) -> tuple[float, float]:
    """The paired difference's interval whose bounds solve tango_z = +z (lower) and -z (upper)."""
    edge = 1 - 1e-12

    def bound(target: float) -> float:
        lo_z, hi_z = tango_z(b, c, n, -edge) - target, tango_z(b, c, n, edge) - target
        if lo_z <= 0:
            return -1.0
        if hi_z >= 0:
            return 1.0
        return float(optimize.brentq(lambda d: tango_z(b, c, n, d) - target, -edge, edge, xtol=1e-12))

    return bound(z), bound(-z)


def _answered_by_both(samples: pd.DataFrame) -> int:
    """Validation images (``pair_id``) with a row of each arm, whatever the answer."""
    if "pair_id" not in samples.columns:
        return 0
    replayed = samples.dropna(subset=["pair_id"])
    return int((replayed.groupby("pair_id")["arm"].nunique() == 2).sum())


def fewest_pairs(margin: float, level: float) -> int | None:
    """The fewest validation images on which a canary answering each one as the baseline does (no
    discordant pair) shows the paired accuracy ``margin`` at one-sided ``level``: Tango's score
    is then -sqrt(n m / (1 - m)), past -z once n m / (1 - m) > z^2. None for a margin of 0 (or a
    level of 0): no such canary shows it, only one that gets more images right."""
    if margin <= 0 or level <= 0:
        return None
    z = float(stats.norm.isf(level))
    return math.floor(z * z * (1 - margin) / margin) + 1


def paired_accuracy_check(pairs: pd.DataFrame, cfg: GateConfig, level: float) -> Check:
    """Tango's score test of the paired accuracy drop against the margin, with its score interval;
    the exact McNemar p-value beside it. The test holds its level where adjusted Wald intervals
    (Agresti-Min's) do not: a canary at the margin that only loses images shows no discordant
    pair in 10% of 450-image sets, which they read as shown within 0.5 pp. So a set too small
    shows an equal canary within the margin at no level; the sentence says so, with the size
    that would."""
    n = len(pairs)
    b = int(((pairs["baseline"] == 1) & (pairs["canary"] == 0)).sum())  # only the baseline right
    c = int(((pairs["baseline"] == 0) & (pairs["canary"] == 1)).sum())  # only the canary right
    drop = (b - c) / n
    z = float(stats.norm.isf(level))
    lower, upper = tango_interval(b, c, n, z)
    p_exact = float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    score = tango_z(b, c, n, cfg.accuracy_margin)
    p_harm = float(stats.norm.sf(score))  # the fail test's: below the level exactly when it fails
    # The test itself decides (its interval agrees, up to the root's tolerance).
    decision = "pass" if score < -z else "fail" if score > z else "wait"
    acc_b, acc_c = float(pairs["baseline"].mean()), float(pairs["canary"].mean())
    m = cfg.accuracy_margin
    text = (
        f"Validation replay on the same {n} images: baseline accuracy {100 * acc_b:.2f}%, canary "
        f"{100 * acc_c:.2f}%; {b} images only the baseline got right, {c} only the canary; drop "
        f"{_signed(drop, m)} pp (interval {_signed(lower, m)} to {_signed(upper, m)} pp) against the "
        f"{limit_percent(m)} pp margin: {decision}; one-sided p that the drop exceeds the margin: "
        f"{p_harm:.3g} (this look's level {level:.3g}; exact McNemar one-sided p of any drop: {p_exact:.3g})."
    )
    fewest = fewest_pairs(m, level)
    if decision == "wait" and fewest is not None and n < fewest and c <= b:
        text += (
            f" {n} images cannot show the margin at this look's level unless the canary gets more of them right "
            f"than the baseline: an equal canary needs at least {fewest} (a larger validation set, or a wider margin)."
        )
    mde = (upper - lower) / 2 * (1 + float(stats.norm.ppf(cfg.power)) / z)
    return Check(
        "accuracy_paired",
        decision,
        text,
        "Tango's score test against the margin (its p) and interval for the paired difference; "
        "exact McNemar p of any drop (binomial on discordant pairs) beside it",
        n_baseline=n,
        n_canary=n,
        statistic=score,
        p_value=p_harm,
        level=level,
        effect=drop,
        ci=(lower, upper),
        margin=cfg.accuracy_margin,
        mde=mde,
    )


def bucket_quantile_check(base: list[tuple[float, float]], canary: list[tuple[float, float]], q: float) -> Check:
    """A quantile from Prometheus histogram buckets (when only the histograms are at hand)."""
    from vision_rollout.metrics import quantile_from_buckets

    eb, lb, hb = quantile_from_buckets(base, q)
    ec, lc, hc = quantile_from_buckets(canary, q)
    effect = ec / eb - 1 if eb > 0 else math.inf
    bounds = (lc / hb - 1 if hb > 0 else -1.0, hc / lb - 1 if lb > 0 else math.inf)
    name = f"latency_p{round(q * 100)}_buckets"
    text = (
        f"p{round(q * 100)} from histogram buckets: canary {1000 * ec:.1f} ms (bucket {1000 * lc:.1f}-{1000 * hc:.1f}) "
        f"vs baseline {1000 * eb:.1f} ms (bucket {1000 * lb:.1f}-{1000 * hb:.1f}); the ratio lies in "
        f"{_pct(bounds[0])} to {_pct(bounds[1])} whatever the observations within the buckets."
    )
    return Check(
        name,
        "info",
        text,
        "linear interpolation within the bucket (Prometheus histogram_quantile); "
        "error at most the width of the bucket holding the quantile",
        n_baseline=int(base[-1][1]),
        n_canary=int(canary[-1][1]),
        effect=effect,
        ci=bounds,
        blocks_pass=False,
    )


# -- hard guards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardInputs:
    """What the hard guards look at, fetched by a MetricsSource (or given by a test)."""

    p99_series_ms: tuple[tuple[float, float], ...] | None = None  # (unix time, canary p99 in ms)
    validation_drop: float | None = None  # baseline - canary accuracy on the same validation batch
    shadow_errors: int | None = None
    shadow_requests: int | None = None
    restarts: int | None = None  # restarts of the processes serving the candidate in the stage
    unavailable: str | None = None  # why the guards on Prometheus could not be read (it is down)
    missing: str | None = None  # a guard Prometheus has no data for: it cannot judge, so nothing passes
    # Spans of the stage (unix times, Prometheus' clock) it holds no sample of a server serving the
    # candidate for: restarted without its storage, down, or the servers unscraped.
    unwatched: tuple[tuple[float, float], ...] = ()

    @property
    def unwatched_s(self) -> float:
        return sum(end - start for start, end in self.unwatched)

    def __post_init__(self) -> None:
        if self.p99_series_ms is not None and not self.p99_series_ms and self.missing is None:
            # A series without a point is no data, as no series is: the guard cannot judge.
            object.__setattr__(self, "missing", "the canary's P99 series has no point")


def sustained_breach(
    series: tuple[tuple[float, float], ...], limit: float, seconds: float
) -> tuple[bool, float, float]:
    """Whether the series stayed above ``limit`` for ``seconds`` at some time in it (a breach that
    ended between two looks at it is one all the same); the longest run above it, and how long
    the run at its end has lasted (0 when its last point is not above). A missing point (more
    than twice the series' step between two: no traffic, or no scrape) ends a run."""
    longest = current = 0.0
    breach = False
    run_start = prev = None
    step = min((b[0] - a[0] for a, b in pairwise(series) if b[0] > a[0]), default=math.inf)
    for t, v in series:
        if not v > limit:
            run_start = None
        elif run_start is None or prev is None or t - prev > 2 * step:
            run_start = t
        prev = t
        current = 0.0 if run_start is None else t - run_start
        if run_start is not None and current >= seconds:
            breach = True
        longest = max(longest, current)
    return breach, longest, current


def utc_spans(spans: tuple[tuple[float, float], ...]) -> str:
    """``spans`` (unix seconds) as "12:00:10 to 12:02:10, ... UTC", the first three named."""
    from datetime import UTC, datetime

    def hms(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")

    named = ", ".join(f"{hms(a)} to {hms(b)}" for a, b in spans[:3])
    more = f" and {len(spans) - 3} more" if len(spans) > 3 else ""
    return f"{named}{more} UTC"


def guard_checks(g: GuardInputs, cfg: GateConfig) -> list[Check]:
    out = []
    if g.p99_series_ms is not None and not g.p99_series_ms:
        out.append(
            Check(
                "guard_p99",
                "wait",
                f"Canary P99 has no data (limit {cfg.p99_ms_max:g} ms): nothing passes without it.",
                "hard guard on a Prometheus range query",
                margin=cfg.p99_ms_max,
            )
        )
    elif g.p99_series_ms is not None:
        # A breach under way holds the stage: passing it (its bake time shorter than the breach
        # allowed, or the breach starting just before the stage's last look) would carry the
        # breach past the guard, into the next stage's series or the promotion.
        breach, longest, lasted = sustained_breach(g.p99_series_ms, cfg.p99_ms_max, cfg.p99_breach_seconds)
        last = g.p99_series_ms[-1][1]
        decision = "fail" if breach else "wait" if last > cfg.p99_ms_max else "pass"
        held = ": nothing passes while it is above" if decision == "wait" else ""
        out.append(
            Check(
                "guard_p99",
                decision,
                f"Canary P99 is {last:.1f} ms (limit {cfg.p99_ms_max:g} ms); above the limit for the last "
                f"{lasted:.0f} s, for {longest:.0f} s at most at a time in this stage "
                f"(rollback after {cfg.p99_breach_seconds:g} s){held}.",
                "hard guard on a Prometheus range query",
                effect=last,
                margin=cfg.p99_ms_max,
            )
        )
    if g.unwatched:
        out.append(
            Check(
                "guard_history",
                "info",
                f"Prometheus holds no sample of a server serving the candidate for {g.unwatched_s:.0f} s of this "
                f"stage ({utc_spans(g.unwatched)}: restarted without its storage, down, or the servers unscraped): a breach, "
                "a restart or shadow errors then are not seen, so the stage bakes that much longer under the guards.",
                "coverage of the hard guards' Prometheus range queries",
                effect=g.unwatched_s,
                blocks_pass=False,
            )
        )
    if g.validation_drop is not None:
        breach = g.validation_drop > cfg.accuracy_drop_max
        out.append(
            Check(
                "guard_accuracy_drop",
                "fail" if breach else "pass",
                f"Accuracy drop on the validation batch is {_signed(g.validation_drop, cfg.accuracy_drop_max)} pp "
                f"(limit {limit_percent(cfg.accuracy_drop_max)} pp).",
                "hard guard, point estimate",
                effect=g.validation_drop,
                margin=cfg.accuracy_drop_max,
            )
        )
    if g.shadow_requests:
        rate = (g.shadow_errors or 0) / g.shadow_requests
        breach = rate > cfg.shadow_error_rate_max
        out.append(
            Check(
                "guard_shadow_errors",
                "fail" if breach else "pass",
                f"Shadow error rate is {percent_beside(rate, cfg.shadow_error_rate_max, 3)}% "
                f"({g.shadow_errors}/{g.shadow_requests}; limit {limit_percent(cfg.shadow_error_rate_max)}%).",
                "hard guard, point estimate",
                effect=rate,
                margin=cfg.shadow_error_rate_max,
            )
        )
    if g.restarts is not None:
        # A restart loses the requests in flight (the mesh answers them 503, which no counter of
        # the server sees), the process's counters and its prediction-log records not yet written:
        # the other checks then judge what the crashes left.
        out.append(
            Check(
                "guard_restarts",
                "fail" if g.restarts > cfg.restarts_max else "pass",
                f"The candidate's serving processes restarted {g.restarts} time{'s' if g.restarts != 1 else ''} "
                f"in this stage (limit {cfg.restarts_max}).",
                "hard guard on a Prometheus query",
                effect=g.restarts,
                margin=cfg.restarts_max,
            )
        )
    return out


# -- the gate --------------------------------------------------------------------------------


def unreadable(samples: pd.DataFrame) -> str | None:
    """What no check can read in the samples, in a sentence (None when all is readable): a
    latency that is not a positive, finite number of milliseconds; an error, OOM or correctness
    that is not 0 or 1 (NaN is none: no answer, no request of its own, no label). An Inf latency
    made every latency interval NaN (a wait no sample resolves), an error of 5 counted five."""
    for name in ("latency_ms", "error", "oom", "correct"):
        if name not in samples.columns:
            continue
        try:
            x = samples[name].to_numpy(dtype=float, na_value=np.nan)
        except (TypeError, ValueError):
            return f"{name} must be numbers"
        x = x[~np.isnan(x)]
        bad = ~(np.isfinite(x) & (x > 0)) if name == "latency_ms" else ~np.isin(x, (0.0, 1.0))
        if bad.any():
            want = "positive and finite (milliseconds)" if name == "latency_ms" else "0 or 1 (or empty)"
            return f"{name} must be {want}: {int(bad.sum())} row(s) are not, the first {x[bad][0]!r}"
    return None


def check_samples(samples: pd.DataFrame) -> None:
    """ValueError, in a sentence, for samples the gate cannot judge: a column missing, a value
    no check can read (``unreadable``), an arm neither baseline nor canary."""
    missing = {"arm", "latency_ms", "error"} - set(samples.columns)
    if missing:
        raise ValueError(f"samples lack column(s) {sorted(missing)}")
    if (problem := unreadable(samples)) is not None:
        raise ValueError(problem)
    arms = set(samples["arm"].unique())
    if not arms <= {"baseline", "canary"}:
        raise ValueError(f"arm must be 'baseline' or 'canary', found {sorted(arms - {'baseline', 'canary'})}")


def arm_latencies(samples: pd.DataFrame, latency_from: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The latencies the latency checks read, baseline's and canary's: the rows of source
    ``latency_from`` (all rows when None) with a latency."""
    if latency_from is not None and "source" not in samples.columns:
        raise ValueError("latency_from needs a 'source' column")
    rows = samples if latency_from is None else samples[samples["source"] == latency_from]
    base, canary = (
        rows.loc[rows["arm"] == arm, "latency_ms"].dropna().to_numpy(dtype=float) for arm in ("baseline", "canary")
    )
    return base, canary


def information(samples: pd.DataFrame, latency_from: str | None = None) -> int:
    """A look's information for the latency checks, as ``boundaries`` reads it: the latencies of
    the smaller arm (``arm_latencies``), whose mean's variance theirs is (the arms' shares fixed
    within a stage). The other checks count other rows (``Information``)."""
    return min(len(arm) for arm in arm_latencies(samples, latency_from))


class Information(NamedTuple):
    """A look's information per check, as ``boundaries`` reads it, the smaller arm's count of the
    rows each check reads: ``latency``, its latencies (``information``; the paired accuracy check
    too: it reads the same validation images at every look, the same statistic, judged at most at
    the level of its most lenient look, never above alpha); ``requests``, the errors and OOM
    checks' requests, the validation replay's included (its rounds come at a steady pace, the
    live requests with the traffic, so the two grow apart); ``labels``, the live accuracy check's
    labelled rows. One measure for all (the latencies) took the proportions' looks to hold
    information they did not: the error check passed a canary at the margin in 0.054 of the
    stages at alpha 0.05, live traffic falling from 3x to 1x beside the replay's rounds."""

    latency: float
    requests: float
    labels: float


# What a stage's judgement reckons (``Reckoning``): a level per look and information measure, one need.
MAX_RECKONED = len(Information._fields) * MAX_LOOKS + 1


INFORMATION_OF = {"errors": "requests", "oom": "requests", "accuracy_live": "labels"}  # else latency


def look_information(samples: pd.DataFrame, latency_from: str | None = None) -> Information:
    """``Information`` of a look's samples: what ``evaluate_gate``'s checks count in them."""
    labelled = samples[samples["correct"].notna()] if "correct" in samples.columns else samples.iloc[:0]
    if "pair_id" in labelled.columns:
        labelled = labelled[labelled["pair_id"].isna()]
    requests, labels = (
        min(int((rows["arm"] == arm).sum()) for arm in ("baseline", "canary"))
        for rows in (samples[samples["error"].notna()], labelled)
    )
    return Information(information(samples, latency_from), requests, labels)


def check_information(name: str, information: tuple[Information, ...]) -> tuple[float, ...]:
    """The information of looks 1..k for the check ``name`` (``INFORMATION_OF``)."""
    measure = Information._fields.index(INFORMATION_OF.get(name, "latency"))
    return tuple(seen[measure] for seen in information)


def evaluate_gate(
    samples: pd.DataFrame,
    config: Any = None,
    look: int = 1,
    looks: int = 1,
    guards: GuardInputs | None = None,
    buckets: dict[str, list[tuple[float, float]]] | None = None,
    latency_from: str | None = None,
    replay_images: int = 0,
    latency_unjudged: str | None = None,
    latency_carried_to: int | None = None,
    information: tuple[Information, ...] | None = None,
    reckoning: Reckoning | None = None,
) -> Verdict:
    """Judge a canary against its baseline at look ``look`` of ``looks`` planned.

    ``buckets`` ({"baseline": [(le, count)], "canary": [...]}, seconds) adds the p99 read from
    Prometheus histograms, with its error bound, to the report. ``latency_from`` names the
    ``source`` (``live`` or ``replay``) whose rows the latency checks and the sample minimum
    read; errors count every request of each arm (a row whose ``error`` is not NaN), whatever its source.
    ``replay_images``: the images of a validation round; when given, the paired accuracy check
    judges only a whole round (each image answered by both arms) and waits, holding the gate,
    until one is in: a round's first images are no sample of the set (``labels.csv`` is often
    ordered by class), and a look without the check would pass on latency and errors alone.
    ``latency_unjudged``: why the latency comparison of these samples decides nothing (its arms
    were not under equal load); the latency checks are then reported, with that sentence, and
    neither hold nor fail the gate.
    ``latency_carried_to``: at a stage's last look, the weight of the next stage, which judges
    latency on its own live arms and must show it: a look held by the geometric-mean latency
    check alone (not failed, its samples enough) passes, the check reported as carried there.
    ``information``: what looks 1..``look`` saw (``look_information`` of each look's samples),
    for the boundary of this look, each check's at its own information (``check_information``);
    None for looks of equal information. The verdict's level is the latency checks'.
    ``reckoning``: the levels reckoned before (``nominal_alpha``'s).
    """
    cfg = GateConfig.from_any(config)

    def level_of(name: str) -> float:
        seen = None if information is None else check_information(name, information)
        return nominal_alpha(cfg.alpha, look, looks, cfg.spending, seen, reckoning)

    level = level_of("latency")
    check_samples(samples)
    base = samples[samples["arm"] == "baseline"]
    canary = samples[samples["arm"] == "canary"]
    checks: list[Check] = []
    if guards is not None:
        checks += guard_checks(guards, cfg)

    lat_b, lat_c = arm_latencies(samples, latency_from)
    n_min = min(len(lat_b), len(lat_c))
    if n_min < max(cfg.min_samples, 3):
        what = f"{latency_from} " if latency_from else ""
        checks.append(
            Check(
                "samples",
                "wait",
                f"Too few {what}samples: baseline {len(lat_b)}, canary {len(lat_c)} "
                f"(at least {cfg.min_samples} each before anything can pass).",
                "minimum sample size",
                n_baseline=len(lat_b),
                n_canary=len(lat_c),
            )
        )
    else:
        timed = [
            latency_check(lat_b, lat_c, cfg, level),
            rank_check(lat_b, lat_c, level),
            *(tail_check(lat_b, lat_c, q, cfg, level) for q in (0.95, 0.99)),
        ]
        where = SOURCES.get(latency_from or "")
        timed = [replace(c, sentence=f"{where}: {c.sentence}") for c in timed] if where else timed
        if latency_unjudged:
            timed = [
                replace(c, decision="info", blocks_pass=False, sentence=f"{c.sentence} Not judged: {latency_unjudged}")
                for c in timed
            ]
        checks += timed
    # Errors count every request, answered or not: a canary failing most of its requests has few
    # latencies (a failure's is not an answer's) and must still fail here. A row whose error is
    # NaN is no request of its own (a batch request's other items).
    nb, nc = int(base["error"].count()), int(canary["error"].count())
    if min(nb, nc) >= max(cfg.min_samples, 3):
        checks.append(
            proportion_check(
                "errors",
                "Error rate",
                True,
                int(base["error"].sum()),
                nb,
                int(canary["error"].sum()),
                nc,
                cfg.error_margin,
                cfg,
                level_of("errors"),
            )
        )
        if "oom" in samples.columns:
            checks.append(
                proportion_check(
                    "oom",
                    "Out-of-memory rate",
                    True,
                    int(base["oom"].sum()),
                    nb,
                    int(canary["oom"].sum()),
                    nc,
                    cfg.error_margin,
                    cfg,
                    level_of("oom"),
                )
            )
    if "correct" in samples.columns:
        labelled = samples[samples["correct"].notna()]
        if "pair_id" in samples.columns and labelled["pair_id"].notna().any():
            paired = labelled.dropna(subset=["pair_id"])
            pairs = paired.pivot_table(index="pair_id", columns="arm", values="correct", aggfunc="first").dropna()
            both = {"baseline", "canary"} <= set(pairs.columns)
            answered = _answered_by_both(samples)
            if both and len(pairs) >= 1 and answered >= replay_images:
                checks.append(paired_accuracy_check(pairs, cfg, level))
            labelled = labelled[labelled["pair_id"].isna()]
        if {"baseline", "canary"} <= set(labelled["arm"]):
            checks.append(live_accuracy_check(labelled, cfg, level_of("accuracy_live")))

    if replay_images and not any(c.name == "accuracy_paired" for c in checks):
        answered = _answered_by_both(samples)
        checks.append(
            Check(
                "accuracy_paired",
                "wait",
                f"Validation replay: {min(answered, replay_images)} of {replay_images} images answered by both "
                "versions; the paired accuracy check judges a whole round, and nothing passes before it.",
                "whole validation round before the paired accuracy check",
                n_baseline=answered,
                n_canary=answered,
                margin=cfg.accuracy_margin,
            )
        )
    if buckets is not None:
        checks.append(bucket_quantile_check(buckets["baseline"], buckets["canary"], 0.99))
    decisive = [c for c in checks if c.decision != "info"]
    if any(c.decision == "fail" for c in decisive):
        decision = "fail"
    elif all(c.decision == "pass" for c in decisive if c.blocks_pass) and not any(
        c.decision == "wait" and c.blocks_pass for c in decisive
    ):
        decision = "pass"
    else:
        decision = "wait"
    holding = [c for c in decisive if c.decision == "wait" and c.blocks_pass]
    carried: list[Check] = []
    if decision == "wait" and latency_carried_to is not None and [c.name for c in holding] == ["latency_geomean"]:
        # Not shown, not failed: the next stage's live arms judge it, and promotion needs that
        # stage (or a later one below 100%) to show it, a level-alpha test of its own.
        carried = [
            replace(
                holding[0],
                decision="info",
                blocks_pass=False,
                sentence=f"{holding[0].sentence} Carried to the {latency_carried_to}% stage, whose live arms must "
                "show it before anything is promoted.",
            )
        ]
        checks = [carried[0] if c is holding[0] else c for c in checks]
        decision = "pass"
    # A pass is the statistics' (the guards only could have failed it); a fail or wait names its cause.
    if decision == "pass":
        ranked = sorted(checks, key=lambda c: c.name.startswith("guard_"))
    else:  # (a hold first: the tenant it names leads the reason, whatever else waits)
        ranked = sorted(checks, key=lambda c: not c.held)
    reasons = [c.sentence for c in carried] + [c.sentence for c in ranked if c.decision == decision]
    reasons = reasons or [c.sentence for c in checks[:1]]
    summary = f"{decision.upper()} at look {look} of {looks} (latency's one-sided level {level:.4g}): " + " ".join(
        reasons[:3]
    )
    return Verdict(decision, tuple(checks), look, looks, cfg.alpha, level, cfg.spending, summary)
