"""World states kept for reuse, by number of worlds.

A vector env whose worlds restart at different times starts a small state for every step's new
worlds and, two blocks later, writes it back into the big one (`merge.absorb`). Starting each from
a state given back before (`WorldModel.start(..., into=...)`, which restarts it in place) keeps its
tensors: no allocation, and the CUDA graphs captured on it replay its first blocks too.
"""

from __future__ import annotations

from collections import OrderedDict

from .state import WorldState


class StatePool:
    """Idle `WorldState`s by batch size: at most `per_size` of one size, `capacity` in all and, with
    `max_worlds`, states of at most that many worlds together (which bounds their memory: a vector env
    of N worlds keeps at most N worlds' caches idle). The least recently given back go first, and with
    them their CUDA graphs. Three of a size by default: a vector env's cohort of new worlds holds its
    state for three steps, so several of one size are out at once (`benchmarks/pool_hit_rate.py`, 64
    worlds, episodes of 20 steps: 2 of a size left 9 of 193 cohorts without a state, 3 left 5).
    `hits` and `misses` count the takes answered and not."""

    def __init__(self, capacity: int = 16, per_size: int = 3, max_worlds: int | None = None) -> None:
        self._idle: OrderedDict[int, WorldState] = OrderedDict()  # id(state) -> state, oldest first
        self._per_size = _count(per_size, "per_size")
        self._max_worlds = None if max_worlds is None else _count(max_worlds, "max_worlds")
        self.capacity = capacity
        self.hits = 0  # takes answered with an idle state
        self.misses = 0  # takes that found none (the caller starts a new state)

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = _count(value, "capacity")
        self._trim()

    @property
    def per_size(self) -> int:
        return self._per_size

    @property
    def max_worlds(self) -> int | None:
        return self._max_worlds

    @property
    def worlds(self) -> int:
        """Worlds of the idle states together."""
        return sum(state.batch_size for state in self._idle.values())

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, batch_size: int) -> WorldState | None:
        """An idle state of `batch_size` worlds (the most recently given back), or None."""
        for key in reversed(self._idle):
            if self._idle[key].batch_size == batch_size:
                self.hits += 1
                return self._idle.pop(key)
        self.misses += 1
        return None

    def give(self, state: WorldState) -> None:
        """Keep a state nothing else uses any more, for a later `take`."""
        self._idle.pop(id(state), None)
        same_size = [key for key, idle in self._idle.items() if idle.batch_size == state.batch_size]
        for key in same_size[: max(0, len(same_size) + 1 - self._per_size)]:
            del self._idle[key]
        if self._per_size:
            self._idle[id(state)] = state
        self._trim()

    def clear(self) -> None:
        self._idle.clear()

    def _trim(self) -> None:
        while len(self._idle) > self._capacity or (self._max_worlds is not None and self.worlds > self._max_worlds):
            self._idle.popitem(last=False)


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: keep none), got {value!r}")
    return value
