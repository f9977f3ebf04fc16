"""benchmarks/suite.py: one real (tiny) run end to end, the table, the chart and the argument checks."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "..", "shared", "bench")


def _suite():
    spec = importlib.util.spec_from_file_location("suite", os.path.join(ROOT, "benchmarks", "suite.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_bench = pytest.mark.skipif(not os.path.exists(os.path.join(BENCH_DIR, "workload.py")),
                                 reason="no ../shared/bench/workload.py")


@needs_bench
def test_one_configuration_end_to_end(tmp_path, capsys):
    suite = _suite()
    results = suite.main(["--workloads", "W1", "--algorithms", "maml1", "--iterations", "2", "--meta-batch", "1",
                          "--bench-dir", BENCH_DIR, "--json", str(tmp_path / "r.json"),
                          "--png", str(tmp_path / "r.png")])
    (row,) = results
    assert row["workload"] == "W1" and row["implementation"] == "paddlefsl MAML 1st"
    assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["peak_rss_mib"] > 50
    assert row["tasks_per_s"] == pytest.approx(1 / row["median_s"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"][0]["median_s"] == row["median_s"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "| W1 | paddlefsl MAML 1st |" in capsys.readouterr().out


@needs_bench
def test_w2x10_is_w2_with_ten_steps():
    table = _suite().load_workloads(BENCH_DIR)
    assert table["W2x10"]["steps"] == 10 and table["W2"]["steps"] != 10
    assert {k: v for k, v in table["W2x10"].items() if k != "steps"} == \
        {k: v for k, v in table["W2"].items() if k != "steps"}


def test_table_and_chart(tmp_path):
    suite = _suite()
    results = [dict(workload="W1", implementation="paddlefsl MAML 2nd", median_s=2.0, tasks_per_s=16.0,
                    peak_rss_mib=700.0, l2l_over_ours=0.5),
               dict(workload="W1", implementation="learn2learn MAML 2nd", median_s=1.0, tasks_per_s=32.0,
                    peak_rss_mib=400.0)]
    text = suite.table(results)
    assert "| W1 | paddlefsl MAML 2nd | 2.000 | 16.00 | 700 | 0.50 |" in text
    assert "| W1 | learn2learn MAML 2nd | 1.000 | 32.00 | 400 |  |" in text
    suite.chart(results, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


@needs_bench
def test_peers_need_their_python(tmp_path):
    with pytest.raises(SystemExit):
        _suite().main(["--peers", "--peer-python", str(tmp_path / "none"), "--bench-dir", BENCH_DIR])


def test_ratios_against_the_peers_plain_paddle_and_the_peak():
    suite = _suite()
    rows = [dict(workload="W2", implementation=name, median_s=t, tasks_per_s=4 / t, peak_rss_mib=1.0)
            for name, t in [("paddlefsl MAML 2nd", 5.5), ("learn2learn MAML 2nd", 2.75), ("paddlefsl MAML 1st", 2.2),
                            ("learn2learn MAML 1st", 2.2), ("plain Paddle 1st", 2.0), (suite.FAST_OFF, 2.1)]]
    suite.ratios(rows)
    by = {r["implementation"]: r for r in rows}
    assert by["paddlefsl MAML 2nd"]["l2l_over_ours"] == pytest.approx(0.5)
    assert by["paddlefsl MAML 2nd"]["peak_fraction"] == pytest.approx(0.1)
    assert by["paddlefsl MAML 1st"]["l2l_over_ours"] == pytest.approx(1.0)
    assert by[suite.FAST_OFF]["over_plain_paddle"] == pytest.approx(1.05)
    assert "l2l_over_ours" not in by["learn2learn MAML 2nd"]
    text = suite.table(rows)
    assert "| W2 | paddlefsl MAML 2nd | 5.500 | 0.73 | 1 | 0.50 | 10% of peak |" in text
    assert f"| W2 | {suite.FAST_OFF} | 2.100 | 1.90 | 1 |  | +5% against plain Paddle 1st |" in text


def test_rounds_interleave_and_take_the_median(monkeypatch, tmp_path):
    suite = _suite()
    order, times = [], iter([3.0, 1.0, 5.0, 2.0, 4.0, 9.0])

    def fake(workload, algorithm, iterations, bench_dir, meta_batch, env):
        order.append(algorithm)
        return {"median_s": next(times), "times_s": [0.0], "peak_rss_mib": 10.0}

    monkeypatch.setattr(suite, "measure_ours", fake)
    results = suite.main(["--workloads", "W1", "--algorithms", "maml2", "maml1", "--rounds", "3",
                          "--bench-dir", BENCH_DIR])
    assert order == ["maml2", "maml1"] * 3
    by = {r["implementation"]: r for r in results}
    assert by["paddlefsl MAML 2nd"]["median_s"] == 4.0 and by["paddlefsl MAML 2nd"]["round_medians_s"] == [3.0, 5.0, 4.0]
    assert by["paddlefsl MAML 1st"]["median_s"] == 2.0


def test_same_allocator_rows_compare_like_with_like():
    """Ours with the memory reuse off against learn2learn as it comes; learn2learn with glibc's thresholds raised
    against ours as it comes (both raised)."""
    suite = _suite()
    rows = [dict(workload="W1", implementation=name, median_s=t, tasks_per_s=32 / t, peak_rss_mib=1.0)
            for name, t in [("paddlefsl MAML 2nd", 2.0), ("learn2learn MAML 2nd", 1.0),
                            ("paddlefsl MAML 2nd" + suite.REUSE_OFF, 4.0),
                            ("learn2learn MAML 2nd" + suite.TUNED, 0.5)]]
    suite.ratios(rows)
    by = {r["implementation"]: r for r in rows}
    assert by["paddlefsl MAML 2nd"]["l2l_over_ours"] == pytest.approx(0.5)
    assert by["paddlefsl MAML 2nd" + suite.REUSE_OFF]["l2l_over_ours"] == pytest.approx(0.25)
    assert by["learn2learn MAML 2nd" + suite.TUNED]["l2l_over_ours"] == pytest.approx(0.25)
    assert suite.TUNED_MALLOC == {"MALLOC_MMAP_THRESHOLD_": str(suite_allocator().MMAP_THRESHOLD),
                                  "MALLOC_TRIM_THRESHOLD_": str(suite_allocator().TRIM_THRESHOLD)}


def suite_allocator():
    from paddlefsl.metaopt.kernels import allocator
    return allocator


@needs_bench
def test_the_batched_configuration_runs_all_tasks_in_one_learner(tmp_path):
    suite = _suite()
    (row,) = suite.main(["--workloads", "W1", "--algorithms", "maml2b", "--iterations", "1", "--meta-batch", "2",
                         "--bench-dir", BENCH_DIR])
    assert row["implementation"] == "paddlefsl MAML 2nd, tasks batched" and row["median_s"] > 0


def test_batched_rows_are_compared_with_learn2learn():
    suite = _suite()
    results = [dict(workload="W1", implementation="paddlefsl MAML 2nd, tasks batched", median_s=0.5),
               dict(workload="W1", implementation="learn2learn MAML 2nd", median_s=1.0)]
    suite.ratios(results)
    assert results[0]["l2l_over_ours"] == pytest.approx(2.0)
