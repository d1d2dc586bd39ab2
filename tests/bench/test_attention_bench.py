"""bench.attention's tree sweep (VinePPO's nested MC batch) runs at a tiny size and counts KV reads."""
from __future__ import annotations

import json

from bench import attention


def test_tree_sweep_reports_each_methods_reads_against_every_page_once(tmp_path):
    out = tmp_path / "attention.json"
    result = attention.main(["--quick", "--only", "tree", "--no-flex", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"cascade", "one-level", "plain"}
    assert all(r["status"] == "ok" and r["time_us"] > 0 for r in rows.values())
    # 1 episode x 3 nested states (32, 48, 64 shared tokens) x K = 2: the full tree reads each page once.
    assert rows["cascade"]["read_over_ideal"] == 1.0
    assert 1.0 < rows["one-level"]["read_over_ideal"] < rows["plain"]["read_over_ideal"]
    assert rows["cascade"]["batch"] == 6 and rows["cascade"]["states"] == 3
