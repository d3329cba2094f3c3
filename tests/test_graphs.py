"""The graph cache's contract, which CPU runs (graphs off) never exercise: each `run` executes the step exactly
once, the first (the capture) included. A CUDA graph stands in as a replay of the step into the captured output."""

from __future__ import annotations

import numpy as np
import torch

from omnivox.engine.graphs import GraphCache


class ReplayedGraphs(GraphCache):
    """Records a step without running it; `replay` runs it into the output buffer, as a CUDA graph would."""

    def _record(self, fn, static):
        output = torch.zeros(2)

        class Graph:
            def replay(self) -> None:
                output.copy_(fn(**static))

        return Graph(), static, output


def test_every_run_executes_the_step_once_the_capture_included():
    cache = ReplayedGraphs(torch.device("cpu"), enabled=False)
    cache.enabled = True  # graphs "on" without a GPU
    total = torch.zeros(2)

    def step(x: torch.Tensor) -> torch.Tensor:  # updates a buffer it reads, as the TTS step's drawn codes do
        total.add_(x)
        return total.clone()

    outputs = [cache.run("step", step, {"x": np.full(2, float(i), np.float32)}).clone() for i in (1, 2, 3)]
    assert [o.tolist() for o in outputs] == [[1.0, 1.0], [3.0, 3.0], [6.0, 6.0]]
    assert total.tolist() == [6.0, 6.0]
    assert len(cache) == 1
