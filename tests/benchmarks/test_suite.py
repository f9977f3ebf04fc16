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
