"""Results JSON, report text and tables, plot and workload files."""

import io
import json

import pytest
from rich.console import Console

from omnivox.bench.plot import plot_distributions, plot_medians
from omnivox.bench.report import aggregate_block, compare_table, stage_table, summary_table
from omnivox.bench.results import SCHEMA, build_results, read_results, sample_from_metrics, write_results
from omnivox.bench.workloads import STANDARD_WORKLOAD, WorkloadItem, load_workload, split_warmup
from omnivox.engine.types import RequestMetrics
from omnivox.errors import InvalidRequest


def metrics(i: int, ttfb: float, total: float, audio: float, llm=0.4, tts=0.5, audio_stage=0.01) -> RequestMetrics:
    m = RequestMetrics(request_id=f"r{i}", ttfb_s=ttfb, total_s=total, audio_s=audio, llm_tokens=20, tts_steps=50,
                       tts_calls=2, finish_reason="eos")
    m.stages.update(llm=llm, tts=tts, audio=audio_stage, prefill=0.02)
    return m


def samples_for(ttfbs, rtfs, scale=1.0):
    return [sample_from_metrics(metrics(i, t * scale, r * 10.0 * scale, 10.0), prompt_id=f"p{i}", trial=0)
            for i, (t, r) in enumerate(zip(ttfbs, rtfs, strict=True))]


def render(table) -> str:
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(table)
    return console.export_text()


def row(text: str, name: str) -> str:
    """The rendered table line whose first cell is `name`."""
    return next(line for line in text.splitlines() if line.strip("│ ").startswith(name + " "))


def test_sample_from_metrics_fields():
    s = sample_from_metrics(metrics(0, 0.1, 5.0, 10.0), prompt_id="p1", trial=2, underruns=3)
    assert s["rtf"] == 0.5 and s["generation_s"] == pytest.approx(0.9)
    assert (s["prompt_id"], s["trial"], s["underruns"], s["finish_reason"]) == ("p1", 2, 3, "eos")
    assert s["stages"]["audio"] == 0.01 and s["llm_tokens"] == 20 and "error" not in s
    empty = sample_from_metrics(RequestMetrics(request_id="x"), error="EngineBusy: full")
    assert empty["ttfb_s"] is None and empty["rtf"] is None  # NaN / inf become JSON null
    assert empty["error"] == "EngineBusy: full"


def test_results_round_trip(tmp_path):
    samples = samples_for([0.1, 0.2], [0.5, 0.6])
    results = build_results(samples, {"name": "fast", "trials": 1}, dummy_weights=True, extra={"note": 1})
    assert results["schema"] == SCHEMA and results["kind"] == "bench" and results["dummy_weights"] is True
    env = results["environment"]
    assert set(env) == {"device", "torch", "python", "omnivox", "git_commit"} and env["device"]
    path = tmp_path / "out" / "results.json"
    write_results(path, results)
    assert read_results(path) == results
    json.loads(path.read_text())  # strict JSON


def test_a_tree_without_history_is_labelled_by_omnivox_commit(monkeypatch):
    """`git archive` trees measured side by side (bench/ab_gpu.sh) name their commit; otherwise git's HEAD is used."""
    monkeypatch.setenv("OMNIVOX_COMMIT", "84d6bf5")
    assert build_results([], {})["environment"]["git_commit"] == "84d6bf5"
    monkeypatch.setenv("OMNIVOX_COMMIT", "")
    assert build_results([], {})["environment"]["git_commit"] != "84d6bf5"


def test_build_results_rejects_unknown_kind():
    with pytest.raises(InvalidRequest, match="kind"):
        build_results([], {}, kind="nope")


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "is not valid JSON"),
        ('{"schema": "other/9", "kind": "bench"}', "expected 'omnivox.bench/1'"),
        ('{"schema": "omnivox.bench/1", "kind": "x", "config": {}, "environment": {}, "samples": []}', "kind is 'x'"),
        ('{"schema": "omnivox.bench/1", "kind": "bench", "config": {}, "environment": {}}', "'samples' must be"),
        ('{"schema": "omnivox.bench/1", "kind": "bench", "config": {}, "environment": {}, '
         '"samples": [{"ttfb_s": 1, "rtf": 1, "total_s": 1}]}', r"samples\[0\] lacks 'audio_s'"),
        ('{"schema": "omnivox.bench/1", "kind": "bench", "config": {}, "environment": {}, '
         '"samples": [{"ttfb_s": "1", "rtf": 1, "total_s": 1, "audio_s": 1}]}', r"samples\[0\].ttfb_s must be"),
    ],
)
def test_read_results_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidRequest, match=message) as e:
        read_results(path)
    assert str(path) in str(e.value)


def test_read_results_missing_file(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read results"):
        read_results(tmp_path / "absent.json")


def test_aggregate_block_exact_format():
    samples = samples_for([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    samples.append({**samples[0], "ttfb_s": None, "error": "GenerationFailed: boom"})  # failed: excluded
    assert aggregate_block(samples) == (
        "AGGREGATE PERFORMANCE METRICS:\n"
        "   Average time to first byte: 0.200s\n"
        "   Average realtime factor: 0.600\n"
        "   Average generation time: 0.900s\n"
        "   Average audio processing time: 0.010s\n"
        "   TTFB std dev: 0.082s\n"  # population std (np.std), as the original printed
        "   Realtime factor std dev: 0.082"
    )


def test_summary_and_stage_tables():
    samples = samples_for([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    text = render(summary_table(samples))
    for name, median in (("ttfb_s", "0.200s"), ("rtf", "0.600"), ("total_s", "6.000s"), ("generation_s", "0.900s"),
                        ("audio processing", "0.010s")):
        line = row(text, name)
        assert " 3 " in line and median in line
    assert "95% CI of median" in text
    stages = render(stage_table(samples))
    assert "400.00 ms" in stages  # mean llm
    assert "LLM, per token" in stages and "20.00 ms" in stages  # 0.4 s / 20 tokens
    assert "TTS, per audio step" in stages and "10.00 ms" in stages  # 0.5 s / 50 steps


def test_compare_table_contents():
    ttfbs = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17]
    rtfs = [0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62, 0.64]
    a = build_results(samples_for(ttfbs, rtfs), {"name": "reference"})
    b = build_results(samples_for(ttfbs, rtfs, scale=0.5), {"name": "fast"})
    text = render(compare_table(a, b))
    assert "fast vs reference" in text
    ttfb_line = row(text, "ttfb_s")
    assert "0.135s" in ttfb_line and "0.068s" in ttfb_line and "0.500 [" in ttfb_line and "faster" in ttfb_line
    same = render(compare_table(a, a))
    rtf_line = row(same, "rtf")
    assert "1.000 [" in rtf_line and "noise" in rtf_line
    assert "reference (A)" in same


def test_plot_writes_png(tmp_path):
    a = build_results(samples_for([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]), {"name": "A"}, dummy_weights=True)
    b = build_results(samples_for([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], 0.8), {"name": "B"})
    path = plot_distributions([a, b], None, tmp_path / "plots" / "dist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_medians_skips_failed_configs_and_needs_one(tmp_path):
    ok = {"ttfb_s": {"median": 0.6, "ci95": [0.5, 0.7]}, "rtf": {"median": 0.8, "ci95": [0.7, 0.9]}}
    fast = {"ttfb_s": {"median": 0.12, "ci95": [0.11, 0.13]}, "rtf": {"median": 0.07, "ci95": [0.06, 0.08]}}
    path = plot_medians({"reference": ok, "fast": fast, "broken": {"error": "boom"}}, tmp_path / "m.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="at least one"):
        plot_medians({"broken": {"error": "boom"}}, tmp_path / "none.png", "t")


def test_packaged_workload():
    items = load_workload(None)
    assert STANDARD_WORKLOAD.name == "standard.jsonl" and len(items) == 7
    warmup, rest = split_warmup(items)
    assert warmup.id == "warmup" and warmup.prompt == "Hi, how are you?"
    assert [i.id for i in rest] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert all(isinstance(i, WorkloadItem) and i.audio_seconds > 0 and i.reply for i in rest)


GOOD = '{"id": "a", "prompt": "Hi", "reply": "Hello", "audio_seconds": 2.0}'


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"id": "a", "prompt": "Hi", "reply": "Hello"}', "line 2: missing field 'audio_seconds'"),
        ('{"id": "a", "prompt": "Hi", "reply": "x"', "line 2: not valid JSON"),
        ('{"id": "a", "prompt": "  ", "reply": "x", "audio_seconds": 1}', "line 2: field 'prompt' is empty"),
        ('{"id": "a", "prompt": "Hi", "reply": "x", "audio_seconds": 0}', "line 2: field 'audio_seconds' must be a"),
        ('{"id": "a", "prompt": "Hi", "reply": "x", "audio_seconds": "3"}', "line 2: field 'audio_seconds' must be"),
        ('[1, 2]', "line 2: expected a JSON object"),
        (GOOD.replace('"Hi"', '"Yo"'), "line 2: field 'id' repeats 'a' from line 1"),
    ],
)
def test_workload_errors_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "w.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(InvalidRequest, match=message) as e:
        load_workload(path)
    assert str(path) in str(e.value)


def test_workload_blank_lines_and_empty_file(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("\n" + GOOD + "\n\n")
    assert load_workload(path) == [WorkloadItem("a", "Hi", "Hello", 2.0)]
    assert split_warmup(load_workload(path)) == (None, [WorkloadItem("a", "Hi", "Hello", 2.0)])
    path.write_text("\n")
    with pytest.raises(InvalidRequest, match="has no requests"):
        load_workload(path)
    with pytest.raises(InvalidRequest, match="cannot read workload"):
        load_workload(tmp_path / "absent.jsonl")
