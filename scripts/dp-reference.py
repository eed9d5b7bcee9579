#!/usr/bin/env python3
"""Reference values for engine::dp from Google's dp_accounting (PyPI `dp-accounting`).

    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting
    /tmp/dpenv/bin/python scripts/dp-reference.py   # writes engine/tests/data/dp_reference.json

Per-order RDP of one step of the Poisson-subsampled Gaussian mechanism
(`_compute_rdp_poisson_subsampled_gaussian`, the function RdpAccountant composes), ε of
RdpAccountant (default orders) after `steps` such steps, and noise multipliers calibrated
to a target ε with `calibrate_dp_mechanism`. Integer orders also get the exact value (`exact`, the binomial sum at 60 digits with
mpmath), against which the double-precision sums of both implementations can be judged.
Infinite values are written as null.
"""

import json
import math
import os
from importlib.metadata import version

import dp_accounting
import mpmath
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy.stats import binom

QS = [1e-4, 0.001, 0.01, 0.0625, 0.25, 1.0]
SIGMAS = [0.5, 0.8, 1.0, 1.5, 3.0, 8.0]
STEPS = [1, 100, 10_000, 100_000]
DELTAS = [1e-5, 1e-6]
ORDERS = rdp.DEFAULT_RDP_ORDERS
# Integer and fractional orders, taken from the default list so that the doubles are the same.
RDP_ORDERS = [o for o in ORDERS if o in (2, 3, 8, 32, 63, 256, 1024)] + [
    ORDERS[i] for i in (0, 4, 14, 26, 94)  # 1.1, 1.5, 2.5, 3.7, 10.5
]
# (q, steps, target ε, δ): a hospital of 17,000 training beats, batch 64, 10 rounds of one
# epoch (2,660 steps), and a few others.
CALIBRATION = [
    (64 / 17000, 2660, 8.0, 1e-5),
    (64 / 17000, 2660, 2.0, 1e-5),
    (64 / 17000, 2660, 8.0, 0.99e-5),  # what engine::dp::plan asks for ε = 8, δ = 1e-5
    (8 / 17000, 21250, 8.0, 1e-5),
    (0.01, 1000, 1.0, 1e-5),
    (0.25, 100, 4.0, 1e-6),
    (1.0, 10, 8.0, 1e-5),
]

# (n, q, steps, failure): padded batches, the smallest k with steps · P(Bin(n, q) > k) ≤ failure
# by scipy's binomial survival function.
PADDED = [
    (17000, 64 / 17000, 2660, 1e-7),
    (17000, 1 / 17000, 170000, 1e-7),
    (1_000_000, 1e-3, 10_000, 1e-7),
    (1_000_000, 0.25, 100_000, 1e-7),
    (500, 0.5, 1000, 1e-3),
]


def finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def exact_rdp(q, sigma, order):
    """RDP at an integer order from the binomial sum at 60 digits (None for other orders)."""
    if order != int(order) or q in (0.0, 1.0):
        return None
    with mpmath.workdps(60):
        q, s2, a = mpmath.mpf(q), 2 * mpmath.mpf(sigma) ** 2, int(order)
        total = mpmath.fsum(mpmath.binomial(a, i) * q**i * (1 - q) ** (a - i)
                            * mpmath.exp(mpmath.mpf(i * i - i) / s2) for i in range(a + 1))
        return float(mpmath.log(total) / (a - 1))


def epsilon(q, sigma, steps, delta):
    acc = rdp.RdpAccountant(ORDERS)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


def calibrate(q, steps, target, delta):
    return dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(ORDERS),
        lambda s: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps
        ),
        target,
        delta,
        dp_accounting.ExplicitBracketInterval(0.1, 100.0),
        tol=1e-9,
    )


def padded(n, q, steps, failure):
    lo, hi = 0, n  # steps · sf(hi) ≤ failure; find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if steps * binom.sf(mid, n, q) <= failure:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main():
    ver = version("dp-accounting")
    print(f"dp-accounting {ver}")
    out = {
        "source": f"dp-accounting {ver} (RdpAccountant, default orders), scripts/dp-reference.py",
        "dp_accounting_version": ver,
        "orders": list(ORDERS),
        "rdp": [
            {"q": q, "sigma": s, "order": a,
             "rdp": finite(rdp._compute_rdp_poisson_subsampled_gaussian(q, s, [a])[0]),
             "exact": exact_rdp(q, s, a)}
            for q in QS for s in SIGMAS for a in RDP_ORDERS
        ],
        "epsilon": [
            {"q": q, "sigma": s, "steps": n, "delta": d, "epsilon": finite(epsilon(q, s, n, d))}
            for q in QS for s in SIGMAS for n in STEPS for d in DELTAS
        ],
        "noise": [
            {"q": q, "steps": n, "epsilon": e, "delta": d, "sigma": calibrate(q, n, e, d)}
            for q, n, e, d in CALIBRATION
        ],
        "padded_batch": [
            {"n": n, "q": q, "steps": s, "failure": f, "k": padded(n, q, s, f)}
            for n, q, s, f in PADDED
        ],
    }
    path = os.path.join(os.path.dirname(__file__), "..", "engine", "tests", "data", "dp_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"{len(out['rdp'])} RDP values, {len(out['epsilon'])} epsilons, "
          f"{len(out['noise'])} calibrations, {len(out['padded_batch'])} padded batches -> {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
