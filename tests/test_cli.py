"""The command line on the embedded tiny model: speak, bench, bench --compare, make-checkpoint, errors."""

from __future__ import annotations

import json

from omnivox.audio import read_wav
from omnivox.cli import main


def test_speak_writes_the_wav_and_says_weights_are_random(tmp_path, capsys):
    out = tmp_path / "reply.wav"
    assert (
        main(["speak", "Hello there, nice to meet you", "-o", str(out), "--seed", "0", "--audio-seconds", "1.5"]) == 0
    )
    pcm, rate = read_wav(out)
    assert rate == 24000 and len(pcm) == round(1.5 * 46.875) * 512
    printed = capsys.readouterr().out
    assert "random" in printed and "Hello there, nice to meet you" in printed and "TTFB" in printed


def test_bench_prints_the_aggregate_block_and_compare_reads_it(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(["bench", "--workload", "demo", "--trials", "1", "--out", str(out), "--plot", str(tmp_path / "p.png")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "AGGREGATE PERFORMANCE METRICS:" in printed and "Average realtime factor" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "omnivox.bench/1" and len(results["samples"]) == 2  # warm-up excluded
    assert len(list((out / "wav").glob("*.wav"))) == 2 and (tmp_path / "p.png").stat().st_size > 0
    assert main(["bench", "--compare", str(out / "results.json"), str(out / "results.json")]) == 0
    assert "noise" in capsys.readouterr().out


def test_make_checkpoint_then_info(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["make-checkpoint", str(ckpt), "--size", "tiny", "--seed", "3"]) == 0
    assert (ckpt / "model.safetensors.index.json").exists() and (ckpt / "assets" / "Vocos.pt").exists()
    assert main(["info", "--model", str(ckpt)]) == 0
    assert "vocos" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["speak", "   ", "-o", str(tmp_path / "x.wav")]) == 2
    assert "text is empty" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().out.lower()
