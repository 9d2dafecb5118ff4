"""bench.e2e_ab's arithmetic: paired differences, their bootstrap interval, the runs at the best."""

from bench.e2e_ab import bootstrap_interval, compare


def _run(hit: float, p90: float = 0.3) -> dict:
    return {"hit_ratio": hit, "latency_p50_s": 0.2, "latency_p90_s": p90, "failed": 0, "requests_per_worker": []}


def test_the_interval_holds_the_mean_and_is_a_point_when_every_difference_is_one():
    assert bootstrap_interval([0.05] * 6) == (0.05, 0.05)
    low, high = bootstrap_interval([0.1, -0.1, 0.0, 0.2, -0.05, 0.1])
    assert low < 0.0417 < high and high - low < 0.3


def test_compare_pairs_each_run_with_its_own_and_counts_the_runs_at_the_best():
    # the same hit ratio summed in another order differs in its last digits: still the best
    pairs = [(_run(0.827), _run(0.709)), (_run(0.827 - 1e-12), _run(0.827)), (_run(0.709, 0.4), _run(0.591, 0.2))]
    c = compare(pairs)
    assert abs(c["hit_difference_points"] - 100 * (0.118 + 0 + 0.118) / 3) < 1e-6
    assert c["best_hit_ratio"] == 0.827 and c["runs_at_best"] == {"defaults": 2, "against": 1}
    assert c["interval_95_points"][0] >= -1e-6 and c["interval_95_points"][1] <= 11.8 + 1e-9
    assert abs(c["latency_p90_ratio"] - (1.0 / 3) / (0.8 / 3)) < 1e-9


def test_the_ab_run_warms_the_stack_up_before_the_first_run_it_counts(monkeypatch):
    """The first run of a benchmark process runs cold (bench.e2e's ``warm_up``): bench.e2e_ab
    replays its case once, uncounted, so that the cold run is neither side's."""
    import bench.e2e_ab as ab

    calls = []

    def run_once(case, clients, seed, topo, service_args):
        calls.append((seed, service_args))
        return _run(0.1, 9.0) if len(calls) == 1 else _run(0.5)  # the first: a cold run's figures

    monkeypatch.setattr(ab, "run_once", run_once)
    monkeypatch.setattr(ab, "write", lambda name, result: name)
    result = ab.main(["--case", "dialogue", "--against", "--new-prefix-window 0", "--repeats", "1"])
    assert calls[0] == (ab.SEEDS[0], ()) and len(calls) == 1 + 2 * len(ab.SEEDS)
    assert all(r[side]["latency_p90_s"] == 0.3 for r in result["rows"] for side in (ab.DEFAULTS_NAME, "against"))
    assert result["comparison"]["latency_p90_ratio"] == 1.0 and "warm-up" in result["description"]
