"""bench/received_attention_blocks.py on a small view: every block size gives the old form's values."""

from __future__ import annotations

from bench_scripts import bench_script


def test_every_block_size_matches_the_old_form():
    with bench_script("received_attention_blocks") as bench:
        rows = bench.main(["--queries", "24", "--keys", "96", "--repeats", "1"])
    assert [r["form"] for r in rows] == ["before"] + ["now"] * 5
    assert rows[0]["max_rel_diff"] == 0.0 and all(r["max_rel_diff"] < 1e-5 for r in rows)
