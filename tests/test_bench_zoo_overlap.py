"""bench/zoo_rank_overlap.py on tiny models and one testbed question each: the plumbing, and that the overlap it
reports can fall below 1 (a rank that truncates). Values are not asserted beyond their range."""

from __future__ import annotations

from bench_scripts import bench_script


def test_tiny_run_reports_every_view_and_rank(tmp_path):
    with bench_script("zoo_rank_overlap") as bench:
        record = bench.main(["--tiny", "--models", "llava-1.5-7b", "--testbed-items", "1", "--testbed-rank", "2",
                              "--json", str(tmp_path / "o.json")])
    rows = record["rows"]
    assert rows[0]["views"].startswith("llava-1.5-7b") and rows[0]["variant"] == "rank=128"
    assert [(r["views"], r["variant"], r["n"]) for r in rows[1:]] == [
        ("testbed llava", "rank=128", 1), ("testbed llava", "rank=2", 1), ("testbed qwen2_vl", "rank=128", 1),
        ("testbed qwen2_vl", "rank=2", 1)]
    for r in rows:
        for keep in ("0.25", "0.11"):
            assert 0 <= r["overlap"][keep]["rank"] <= 1 and 0 <= r["overlap"][keep]["other_seed"] <= 1
    assert rows[1]["overlap"]["0.25"]["rank"] == 1.0  # rank 128 is the full rank of the 128-wide testbed
    assert min(r["overlap"][k]["rank"] for r in rows[2::2] for k in ("0.25", "0.11")) < 1.0  # rank 2 truncates


def test_tiny_run_compares_a_precision_instead(tmp_path):
    with bench_script("zoo_rank_overlap") as bench:
        record = bench.main(["--tiny", "--models", "llava-1.5-7b", "--testbed-items", "1", "--precision", "bfloat16"])
    assert [(r["views"].split(" ")[0], r["variant"]) for r in record["rows"]] == [
        ("llava-1.5-7b", "precision=bfloat16"), ("testbed", "precision=bfloat16"), ("testbed", "precision=bfloat16")]


def test_tiny_run_compares_the_black_box_instead():
    """``--black-box``: the structured estimator against the projector run as a black box (Qwen2.5-VL's merger here):
    the same sensitivities to rounding, so the selections of one tiny view agree."""
    with bench_script("zoo_rank_overlap") as bench:
        record = bench.main(["--tiny", "--models", "qwen2.5-vl-7b", "--testbed-items", "1", "--testbeds", "qwen2_vl",
                             "--black-box"])
    rows = record["rows"]
    assert [(r["views"].split(" ")[0], r["variant"]) for r in rows] == [
        ("qwen2.5-vl-7b", "black_box=True"), ("qwen2.5-vl-7b", "black_box=True"), ("testbed", "black_box=True")]
    assert all(r["overlap"][k]["rank"] == 1.0 for r in rows for k in ("0.25", "0.11"))
