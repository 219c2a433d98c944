"""`speed.warm_to_steady`: how far a benchmark's warm-up steps on before it times steps."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from matrixgame_env.speed import STEADY_STEPS, graph_counts, warm_to_steady
from matrixgame_env.world.model import WorldModel


def test_without_cuda_graphs_the_warm_up_takes_no_extra_step():
    world = WorldModel.from_pretrained("doom-small", device="cpu", dtype=torch.float32)
    assert world.sampler.graphs is None and graph_counts(world) is None
    calls = []
    assert warm_to_steady(world, lambda: calls.append(1)) == 0 and not calls


def _counted_world(captures_on: set[int], replay_from: int):
    """A world whose graph counters move as `step()` is called: step k (from 1) captures a DiT graph when
    k is in `captures_on` and replays its block from step `replay_from` on (the counters a GPU world keeps;
    the loop reads nothing else)."""
    graphs = SimpleNamespace(captures=0, replays=0)
    world = SimpleNamespace(sampler=SimpleNamespace(graphs=graphs), decoder_graphs=None, steps=0)

    def step():
        world.steps += 1
        graphs.captures += world.steps in captures_on
        graphs.replays += world.steps >= replay_from

    return world, step


def test_the_warm_up_ends_after_steady_steps_in_a_row_and_a_capture_starts_the_count_again():
    world, step = _counted_world(captures_on={1, 3}, replay_from=2)
    # step 2 replays without a capture, step 3 captures (the count starts again), steps 4 and 5 are steady
    assert warm_to_steady(world, step) == 3 + STEADY_STEPS
    assert graph_counts(world) == ((2, 0), world.steps - 1)


def test_steps_that_replay_nothing_are_not_steady_and_the_limit_bounds_the_warm_up():
    world, step = _counted_world(captures_on=set(), replay_from=10**6)
    assert warm_to_steady(world, step, limit=7) == 7
