//! The accountant against reference values from Google's `dp_accounting` (produced by
//! scripts/dp-reference.py into tests/data/dp_reference.json), the padded batch against a
//! brute-force binomial tail, and the plan of a realistic job.

use medsplit_engine::dp::{self, DpError, ORDERS};
use serde_json::{Value, json};

fn reference() -> Value {
    serde_json::from_str(include_str!("data/dp_reference.json")).unwrap()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// The reference value, `null` standing for ∞.
fn value_or_inf(v: &Value, key: &str) -> f64 {
    if v[key].is_null() {
        f64::INFINITY
    } else {
        num(v, key)
    }
}

/// |a − b| / |b|, 0 when both are the same (infinite) value.
fn rel(a: f64, b: f64) -> f64 {
    if a == b { 0.0 } else { (a - b).abs() / b.abs() }
}

#[test]
fn orders_are_the_references() {
    let orders: Vec<f64> = reference()["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_f64().unwrap())
        .collect();
    assert_eq!(ORDERS, orders.as_slice());
}

/// Per-order RDP against `dp_accounting` and, at integer orders, against the exact value (the
/// binomial sum at 60 digits). `dp_accounting`'s plain binomial sum loses up to ~1e-9 of relative
/// precision to cancellation where the RDP is tiny (q = 1e-4, σ = 8); ours does not, so against
/// it the tolerance is 1e-9 plus the reference's own error where the exact value shows it.
#[test]
fn rdp_matches_dp_accounting() {
    let cases = reference()["rdp"].as_array().unwrap().clone();
    assert!(cases.len() > 400);
    let (mut worst_ref, mut worst_exact, mut exact_cases) = (0.0f64, 0.0f64, 0);
    for c in &cases {
        let want = value_or_inf(c, "rdp");
        let got = dp::rdp_poisson_gaussian(num(c, "q"), num(c, "sigma"), num(c, "order"));
        let mut tolerance = 1e-9;
        if !c["exact"].is_null() {
            let exact = num(c, "exact");
            let err = rel(got, exact);
            assert!(
                err <= 1e-11,
                "{c}: got {got}, relative error {err:e} to the exact value"
            );
            worst_exact = worst_exact.max(err);
            exact_cases += 1;
            tolerance += rel(want, exact);
        }
        let err = rel(got, want);
        assert!(err <= tolerance, "{c}: got {got}, relative error {err:e}");
        worst_ref = worst_ref.max(err);
    }
    assert!(exact_cases > 200);
    println!(
        "largest relative error of {} RDP values: {worst_ref:e} to dp_accounting, \
         {worst_exact:e} to the {exact_cases} exact values",
        cases.len()
    );
}

#[test]
fn epsilon_matches_dp_accounting() {
    let cases = reference()["epsilon"].as_array().unwrap().clone();
    assert!(cases.len() > 200);
    let mut worst = 0.0f64;
    for c in &cases {
        let want = value_or_inf(c, "epsilon");
        let steps = c["steps"].as_u64().unwrap();
        let got = dp::epsilon(num(c, "q"), num(c, "sigma"), steps, num(c, "delta"));
        let err = rel(got, want);
        assert!(err <= 1e-6, "{c}: got {got}, relative error {err:e}");
        worst = worst.max(err);
    }
    println!(
        "largest relative error of {} epsilons: {worst:e}",
        cases.len()
    );
}

#[test]
fn noise_calibration_matches_dp_accounting() {
    for c in reference()["noise"].as_array().unwrap() {
        let (q, target, delta) = (num(c, "q"), num(c, "epsilon"), num(c, "delta"));
        let steps = c["steps"].as_u64().unwrap();
        let want = num(c, "sigma");
        let got = dp::noise_for_epsilon(q, steps, target, delta).unwrap();
        // The smallest σ within 0.1 %, never below the exact one.
        assert!(
            got >= want * (1.0 - 1e-9) && got <= want * 1.0011,
            "{c}: got {got}"
        );
        assert!(dp::epsilon(q, got, steps, delta) <= target, "{c}");
    }
}

#[test]
fn edge_cases() {
    assert_eq!(dp::rdp_poisson_gaussian(0.0, 1.0, 2.0), 0.0);
    assert_eq!(dp::rdp_poisson_gaussian(0.1, 0.0, 2.0), f64::INFINITY);
    assert_eq!(dp::rdp_poisson_gaussian(1.0, 2.0, 3.0), 3.0 / 8.0);
    assert_eq!(dp::epsilon(0.01, 1.0, 0, 1e-5), 0.0);
    assert_eq!(dp::epsilon(0.0, 1.0, 1000, 1e-5), 0.0);
    assert_eq!(dp::epsilon(0.01, 0.0, 1, 1e-5), f64::INFINITY);
    assert_eq!(dp::epsilon(0.01, 1.0, 10, 0.0), f64::INFINITY);
    // Full batches, a million steps: ε = 1e-3 needs σ beyond 10⁶.
    assert_eq!(dp::noise_for_epsilon(1.0, 1_000_000, 1e-3, 1e-5), None);
    assert_eq!(dp::noise_for_epsilon(0.0, 100, 1.0, 1e-5), Some(0.0));
}

#[test]
fn more_steps_or_sampling_cost_more_and_more_noise_less() {
    let eps = |q, sigma, steps| dp::epsilon(q, sigma, steps, 1e-5);
    let mut last = 0.0;
    for steps in [1, 10, 100, 1_000, 10_000, 100_000] {
        let e = eps(0.01, 1.0, steps);
        assert!(e > last, "{steps} steps: {e} after {last}");
        last = e;
    }
    let mut last = f64::INFINITY;
    for sigma in [0.5, 0.7, 1.0, 1.5, 2.0, 4.0, 10.0] {
        let e = eps(0.01, sigma, 1000);
        assert!(e < last, "σ {sigma}: {e} after {last}");
        last = e;
    }
    let mut last = 0.0;
    for q in [1e-4, 1e-3, 0.01, 0.1, 1.0] {
        let e = eps(q, 1.0, 1000);
        assert!(e > last, "q {q}: {e} after {last}");
        last = e;
    }
}

/// P(Bin(n, q) > k) by direct sums, for small n.
fn brute_tail(n: u64, q: f64, k: u64) -> f64 {
    let mut total = 0.0;
    for i in k + 1..=n {
        let mut c = 1.0f64;
        for j in 0..i {
            c = c * (n - j) as f64 / (j + 1) as f64;
        }
        total += c * q.powi(i as i32) * (1.0 - q).powi((n - i) as i32);
    }
    total
}

#[test]
fn padded_batch_is_the_smallest_k_within_the_failure_probability() {
    for n in [1u64, 2, 7, 20, 60] {
        for q in [0.01, 0.1, 0.37, 0.9] {
            for steps in [1u64, 50, 1000] {
                for failure in [0.4, 1e-3, 1e-6] {
                    let want = (0..=n)
                        .find(|&k| steps as f64 * brute_tail(n, q, k) <= failure)
                        .unwrap();
                    let got = u64::from(dp::padded_batch(n, q, steps, failure));
                    assert_eq!(got, want, "n {n}, q {q}, {steps} steps, failure {failure}");
                }
            }
        }
    }
    assert_eq!(dp::padded_batch(100, 0.0, 10, 1e-6), 0);
    assert_eq!(dp::padded_batch(100, 1.0, 10, 1e-6), 100);
}

#[test]
fn padded_batch_for_a_million_samples() {
    // Mean 1000, standard deviation ≈ 31.6; a per-step failure of 1e-11 is ≈ 6.7 deviations out.
    let k = dp::padded_batch(1_000_000, 1e-3, 10_000, 1e-7);
    assert!((1190..1240).contains(&k), "{k}");
    assert!(dp::padded_batch(1_000_000, 1e-3, 10_000, 1e-9) > k);
    assert!(dp::padded_batch(1_000_000, 1e-3, 100, 1e-7) < k);
}

#[test]
fn padded_batch_matches_scipy() {
    for c in reference()["padded_batch"].as_array().unwrap() {
        let (n, steps, k) = (
            c["n"].as_u64().unwrap(),
            c["steps"].as_u64().unwrap(),
            c["k"].as_u64().unwrap(),
        );
        let got = dp::padded_batch(n, num(c, "q"), steps, num(c, "failure"));
        assert_eq!(u64::from(got), k, "{c}");
    }
}

/// The plan for a hospital of `n` samples in a job of two hospitals, expected batch 64, 10 rounds
/// of one epoch (or `local_steps`), with `dp` as the job's DP settings.
fn plan_for(dp: Value, n: u64, local_steps: Option<u32>) -> Result<dp::DpPlan, DpError> {
    let schedule = dp::Schedule {
        batch_size: 64,
        rounds: 10,
        local_epochs: 1,
        local_steps,
    };
    let delta = dp.get("delta").map_or(1e-5, |d| d.as_f64().unwrap());
    dp::plan_with(
        dp["noise_multiplier"].as_f64(),
        dp["target_epsilon"].as_f64(),
        delta,
        &schedule,
        n,
    )
}

#[test]
fn plan_of_a_realistic_job() {
    // 17,000 training beats, expected batch 64, 10 rounds of one epoch, ε = 8 at δ = 1e-5.
    let n = 17_000;
    let plan = plan_for(json!({"target_epsilon": 8.0, "delta": 1e-5}), n, None).unwrap();
    assert_eq!(plan.sampling_rate, 64.0 / 17_000.0);
    assert_eq!(plan.steps_per_visit, 266);
    assert_eq!(plan.total_steps, 2660);
    assert_eq!(plan.delta, 1e-5);
    assert!(plan.epsilon <= 8.0 && plan.epsilon > 7.95, "{plan:?}");
    // dp_accounting's calibration of the same job at 0.99·δ.
    let reference = reference()["noise"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| num(c, "delta") == 0.99e-5)
        .map(|c| num(c, "sigma"))
        .unwrap();
    assert!(
        rel(plan.noise_multiplier, reference) < 1.1e-3,
        "{plan:?} vs {reference}"
    );
    // Cut with probability ≤ 1e-7 over 2660 steps: 122 (scipy's binomial tail, in the
    // reference data), about seven standard deviations above the mean of 64.
    assert_eq!(plan.padded_batch, 122);
    assert_eq!(dp::spent(&plan, plan.total_steps), plan.epsilon);
    assert_eq!(dp::spent(&plan, 0), 0.0);
    let one_visit = dp::spent(&plan, plan.steps_per_visit);
    let five_visits = dp::spent(&plan, 5 * plan.steps_per_visit);
    assert!(0.0 < one_visit && one_visit < five_visits && five_visits < plan.epsilon);

    // A given σ: its ε.
    let plan = plan_for(json!({"noise_multiplier": 1.0}), n, None).unwrap();
    assert_eq!(plan.noise_multiplier, 1.0);
    assert_eq!(
        plan.epsilon,
        dp::epsilon(64.0 / 17_000.0, 1.0, 2660, 0.99e-5)
    );
    assert!(plan.epsilon < 2.0, "{plan:?}");

    // Fewer samples: a higher sampling rate, fewer steps.
    let small = plan_for(json!({"noise_multiplier": 1.0}), 1_000, None).unwrap();
    assert_eq!(small.total_steps, 160);
    assert!(small.sampling_rate > plan.sampling_rate);

    // local_steps sets the visit; a batch above N samples everything.
    let plan = plan_for(json!({"noise_multiplier": 1.0}), 40, Some(50)).unwrap();
    assert_eq!((plan.steps_per_visit, plan.total_steps), (50, 500));
    assert_eq!((plan.sampling_rate, plan.padded_batch), (1.0, 40));
}

#[test]
fn plan_refuses_what_it_cannot_account_for() {
    let sigma = json!({"noise_multiplier": 1.0});
    assert_eq!(plan_for(sigma, 0, None), Err(DpError::NoSamples));
    let both = json!({"noise_multiplier": 1.0, "target_epsilon": 8.0});
    assert_eq!(plan_for(both, 100, None), Err(DpError::NoiseSetting));
    assert_eq!(plan_for(json!({}), 100, None), Err(DpError::NoiseSetting));
    let bad_delta = json!({"noise_multiplier": 1.0, "delta": 0.0});
    assert_eq!(plan_for(bad_delta, 100, None), Err(DpError::Delta(0.0)));
    let bad_sigma = json!({"noise_multiplier": -1.0});
    assert_eq!(
        plan_for(bad_sigma, 100, None),
        Err(DpError::NoiseMultiplier(-1.0))
    );
    // ε = 1e-6 at δ = 1e-5 over 10,000 steps of full batches needs σ > 10⁶.
    let tiny = json!({"target_epsilon": 1e-6});
    assert!(matches!(
        plan_for(tiny, 10, Some(1000)),
        Err(DpError::Unreachable { .. })
    ));
}
