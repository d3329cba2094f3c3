"""The GPU suite's own code on the CPU with the tiny model: its labels, and the determinism part end to end.

On a GPU the same part found that cuDNN attention changed bf16 outputs from one run to the next; here it checks
that the fast path gives one request the same codes twice, with and without the overlap.
"""

import json

import torch

from omnivox.bench import gpu_suite
from omnivox.bench.gpu_suite import DEFAULT, first_difference, label, parse_sweep


def test_labels_name_what_differs_from_the_engine_defaults():
    assert DEFAULT["compile"] == "auto"  # the engine's own default: the sweep's baseline is what users get
    assert label(dict(DEFAULT)) == "default"
    assert label({**DEFAULT, "compile": "none"}) == "compile=none"
    configs = parse_sweep("compile=none;precision=tf32+compile=reduce-overhead")
    assert [label({**DEFAULT, **c}) for c in configs] == ["compile=none", "precision=tf32+compile=reduce-overhead"]


def test_first_difference():
    a = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert first_difference(a, a.clone()) == -1
    b = a.clone()
    b[1, 1] = 0
    assert first_difference(a, b) == 1
    assert first_difference(a, a[:2]) == 2  # a prefix differs where the shorter one ends


def test_determinism_part_runs_each_request_twice_per_engine(tmp_path):
    argv = ["--device", "cpu", "--size", "tiny", "--out", str(tmp_path), "--parts", "determinism",
            "--validate-precisions", "fp32", "--validate-kinds", "short,read",
            "--determinism-engines", "sequential,overlap"]  # fmt: skip
    assert gpu_suite.main(argv) == 0
    res = json.loads((tmp_path / "summary.json").read_text())["determinism"]["fp32 attention=sdpa"]
    runs = {k: v for k, v in res.items() if k != "warnings"}
    expected = {f"{kind} {engine} run{run}" for kind in ("short", "read") for engine in ("sequential", "overlap")
                for run in (1, 2)}  # fmt: skip
    assert set(runs) == expected
    assert all(v == -1 for v in runs.values()), runs
    assert not torch.are_deterministic_algorithms_enabled()  # the part leaves the global switch as it found it
