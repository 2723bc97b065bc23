"""``kdpipe-bench``: every subcommand runs at small sizes and writes the documented JSON keys."""

from __future__ import annotations

import json

import pytest

from kdpipe.cli.bench import main


def test_store_bench_writes_its_figures(tmp_path):
    main(["store", "--positions", "256", "--synthetic-only", "--json", str(tmp_path / "store.json")])
    written = json.loads((tmp_path / "store.json").read_text())
    rows = written["store"]
    for key in ("bytes_per_entry", "bytes_per_token", "kl_error_nats", "write_tokens_per_s", "read_tokens_per_s"):
        assert all(row[key] > 0 for row in rows), key
    assert {(r["teacher"], r["vocab_size"], r["k"], r["scheme"]) for r in rows} >= {
        ("synthetic", 49152, 64, "sorted-ans-v2"), ("synthetic", 49152, 64, "rowmax-pow4-v1"),
        ("synthetic", 153376, 128, "sorted-ans-v2"),
    }  # fmt: skip
    by = {(r["vocab_size"], r["k"], r["scheme"]): r["bytes_per_entry"] for r in rows}
    # a 256-position store is mostly headers and per-shard models; still, v2 stays below v1
    assert by[(49152, 64, "sorted-ans-v2")] < by[(49152, 64, "rowmax-pow4-v1")] <= 3.0 + 0.2
    assert {r["read_as"] for r in written["posthoc"]} == {"k'=16", "k'=32", "T'=0.5", "T'=0.75", "T'=1.5", "T'=2.0"}


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_loss_bench_measures_each_case_in_its_own_process(tmp_path):
    args = ["loss", "--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--divergences", "jsd", "--no-chunked-floor"]
    main([*args, "--json", str(tmp_path / "loss.json")])  # each process costs an import: keep the cases few
    written = json.loads((tmp_path / "loss.json").read_text())
    summary = written["loss"]
    assert [(r["divergence"], r["tail"]) for r in summary] == [("jsd", "bucket")]
    assert [(c["case"], c["divergence"]) for c in written["cases"]] == [
        ("floor", None), ("plain", "jsd"), ("fused", "jsd")
    ]  # fmt: skip
    for row in summary:
        assert row["peak_mem_ratio_vs_plain"] >= 0  # tiny logits may not grow the RSS high-water mark at all
        assert row["time_ratio_vs_chunked_floor"] is None  # skipped
        for key in ("time_ratio_vs_plain", "time_ratio_vs_floor"):
            assert row[key] > 0, key


def test_the_chunked_floor_runs_the_fused_loops_matmuls():
    from kdpipe.benchmarks.loss import run_case

    row = run_case("chunked_floor", "tiny", "cpu", repeats=1, warmup=0, chunk_size=None)
    assert row["case"] == "chunked_floor" and row["divergence"] is None and row["seconds"] > 0


def test_step_bench_reports_kd_over_sft(tmp_path):
    main(["step", "--models", "demo-student", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "s.json")])
    row = json.loads((tmp_path / "s.json").read_text())["step"][0]
    assert row["kd_over_sft_time"] > 0 and row["sft_tokens_per_s"] > 0


def test_chat_arith_records_are_the_same_examples_in_the_same_order_every_time():
    from kdpipe.benchmarks.step_real import chat_arith_records

    records = chat_arith_records(40)
    assert records == chat_arith_records(40)  # what kdpipe and TRL (benchmarks/trl_sft.py) both train on
    assert len({r["id"] for r in records}) == 40
    assert {r["level"] for r in records} == {1, 2, 3, 4, 5}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)


def test_step_bench_names_an_unknown_packing_mode(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["step", "--models", "smollm2-135m", "--packing", "maybe"])
    assert exit_info.value.code == 2
    assert "--packing: unknown maybe" in capsys.readouterr().err
