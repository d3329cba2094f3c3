"""Greedy audio codes against the engine before batching.

`tests/data/greedy_codes.json` holds the audio codes of three greedy requests on the tiny fp32 model (seed 0): a
read-aloud, a chat with a teacher-forced reply and a free chat of 39 tokens. They were written by this engine at a
commit whose PCM for the three requests was bit-identical, on this workplace's CPU, to that of commit 67d86ad: the
engine before batching, one request at a time, whose outputs were checked token for token against the official
code. Every path of the batched engine is compared with the others elsewhere; this test ties them to that engine,
so a rule every path shares (a step's input, a sampling flag) cannot drift unseen. Rewrite the file
(`python tests/test_golden.py`) only from a tree whose PCM still equals 67d86ad's for these requests.

Greedy codes are argmaxes over fp32 logits: a machine whose arithmetic differs (another BLAS or instruction set)
could flip a near-tie. If this test fails while the path-to-path tests pass, run 67d86ad's engine on that machine
(`git worktree add`, the same three requests): if its codes differ from the file too, the file is what moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine
from omnivox.engine.types import SamplingParams
from omnivox.models.loader import build_dummy_model

GOLDEN = Path(__file__).parent / "data" / "greedy_codes.json"
GREEDY = SamplingParams(greedy=True, max_new_tokens=39)
REQUESTS = {
    "read_aloud": lambda e: e.read_aloud("Read this sentence aloud, slowly and clearly, please.", sampling=GREEDY,
                                         forced_audio_seconds=2.5, request_id="read_aloud"),
    "forced_chat": lambda e: e.stream("Hi", sampling=GREEDY, forced_reply="Hello there, what a nice day it is.",
                                      forced_audio_seconds=2.0, request_id="forced_chat"),
    "free_chat": lambda e: e.stream("Hello!", sampling=GREEDY, request_id="free_chat"),
}


def greedy_codes(model) -> dict[str, list[list[int]]]:
    """Each request's audio codes as the vocoder got them: its windows in order, each repeating the last 4 tokens of
    the one before as context."""
    engine = Engine(model)
    codes: dict[str, list[list[int]]] = {name: [] for name in REQUESTS}
    launch = engine.scheduler._launch_vocoder

    def spy(lives):
        for live in lives:
            codes[live.metrics.request_id].append(np.asarray(live.speech.item.codes).tolist())
        return launch(lives)

    engine.scheduler._launch_vocoder = spy
    for start in REQUESTS.values():
        chunks = list(start(engine))
        assert chunks and chunks[-1].is_last
    return {name: [token for window in windows for token in window] for name, windows in codes.items()}


@pytest.fixture(scope="module")
def ours(model) -> dict[str, list[list[int]]]:
    return greedy_codes(model)


@pytest.mark.parametrize("name", list(REQUESTS))
def test_greedy_codes_equal_the_engine_before_batching(ours, name):
    expected = json.loads(GOLDEN.read_text())[name]
    assert len(ours[name]) == len(expected), f"{name}: {len(ours[name])} audio tokens, {len(expected)} before"
    assert ours[name] == expected


if __name__ == "__main__":
    tiny = build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)
    GOLDEN.write_text(json.dumps(greedy_codes(tiny), separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN}")
