"""Hostile input to schedules: evaluation cost, caps on the raw spec, bounded rates.

* cost: `lr(t)` / `momentum(t)` evaluate each schedule node at most once, counted by
  wrapping the schedules' `value` / `momentum_value` (no clocks), and give the numbers
  of the previous (exponential) implementation, written out below as a reference;
* caps: nesting depth, schedule count and list length are refused before pydantic
  builds anything, and junk of any shape raises nothing but ScheduleError;
* bounds: for hypothesis-generated specs of every registered schedule, `check_rates`
  accepts only schedules whose rate is finite, >= 0 and <= `peak` at every sampled step
  (0, 1, milestones +- 1, ..., 2**62), and refuses only where a reachable rate is not
  finite or the rate grows without bound (naming the parameter).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.errors import ScheduleError
from service.core.schedules import (
    MAX_SCHEDULE_DEPTH,
    MAX_SCHEDULE_LIST,
    MAX_SCHEDULE_NODES,
    MAX_STEP,
    SCHEDULES,
    Schedule,
    check_rates,
    parse_schedule,
)
from service.core.schedules.cyclic import CyclicSchedule, OneCycleSchedule
from service.core.schedules.sequential import SequentialSchedule
from service.core.schedules.step import ConstantSchedule
from service.core.schedules.tf_cosine import NOISE_CLIP, NoisyLinearCosineDecaySchedule

FAR = [0, 1, 2, 10**6, 2**31, 2**53, 2**62, MAX_STEP]

# --- cost: linear in the number of nodes -------------------------------------------------

ONE_CYCLE = {"name": "one_cycle", "max_lr": 0.5, "total_steps": 40}
CYCLIC = {"name": "cyclic", "base_lr": 0.01, "max_lr": 0.2, "step_size_up": 3}
CYCLIC_QUIET = {**CYCLIC, "cycle_momentum": False}
CONSTANT = {"name": "constant", "factor": 0.5, "total_iters": 2}
LEAVES = {"one_cycle": ONE_CYCLE, "cyclic": CYCLIC, "quiet": CYCLIC_QUIET, "const": CONSTANT}


def chain(depth: int, leaf: str, layout: str) -> dict[str, Any]:
    """`depth` sequential levels, each with the next level and leaves around it."""
    spec: dict[str, Any] = dict(LEAVES[leaf])
    for level in range(depth):
        other = LEAVES["const"] if level % 2 else LEAVES[leaf]
        if layout == "inner_first":
            spec = {"name": "sequential", "schedulers": [spec, other], "milestones": [7]}
        elif layout == "inner_last":
            spec = {"name": "sequential", "schedulers": [other, spec], "milestones": [3]}
        else:  # inner in the middle, with a repeated milestone skipping nothing
            spec = {
                "name": "sequential",
                "schedulers": [other, spec, dict(LEAVES["const"])],
                "milestones": [2, 9],
            }
    return spec


def ref_lr(s: Schedule, t: int, base_lr: float) -> float:
    """The rate, recursively, as the previous implementation computed it."""
    if s.warmup is not None and t < s.warmup.steps:
        return s.lr(t, base_lr)
    u = t - s.warmup_steps
    if not isinstance(s, SequentialSchedule):
        return float(s.value(u, base_lr, None))
    i = bisect.bisect_right(s.milestones, u)
    start = s.milestones[i - 1] if i > 0 else 0
    return ref_lr(s.schedulers[i], u - start, base_lr)


def ref_momentum(s: Schedule, t: int) -> float | None:
    """The momentum as the previous implementation computed it (exponential in depth:
    it asked every earlier schedule for its momentum at 0, then again)."""
    u = max(t - s.warmup_steps, 0)
    if not isinstance(s, SequentialSchedule):
        return s.momentum_value(u)
    ms, children = s.milestones, s.schedulers
    i = bisect.bisect_right(ms, u)
    start = ms[i - 1] if i > 0 else 0
    now = ref_momentum(children[i], u - start)
    if now is not None:
        return now
    for j in range(i - 1, -1, -1):
        first = ms[j - 1] if j > 0 else 0
        end = ms[j]
        if end > first and ref_momentum(children[j], 0) is not None:
            return ref_momentum(children[j], end - first - 1)
    for child in reversed(children):
        initial = ref_momentum(child, 0)
        if initial is not None:
            return initial
    return None


class Counter:
    """Counts calls of `value` and `momentum_value` on the schedule classes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for cls in (OneCycleSchedule, CyclicSchedule, SequentialSchedule):
            self._wrap(monkeypatch, cls, "value")
            self._wrap(monkeypatch, cls, "momentum_value")
        # constant inherits momentum_value (and with it cycles_momentum's default): only
        # its value is wrapped
        self._wrap(monkeypatch, ConstantSchedule, "value")

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        original = getattr(cls, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    def count(self, fn: Callable[[], object]) -> int:
        self.calls = 0
        fn()
        return self.calls


STEPS = [0, 1, 2, 3, 5, 8, 9, 10, 13, 20, 39, 40, 41, 77, 200, 10**6, 2**62]


@pytest.mark.parametrize("layout", ["inner_first", "inner_last", "middle"])
@pytest.mark.parametrize("leaf", ["one_cycle", "cyclic", "quiet", "const"])
def test_evaluation_is_linear_in_depth(
    monkeypatch: pytest.MonkeyPatch, leaf: str, layout: str
) -> None:
    counter = Counter(monkeypatch)
    for depth in range(1, MAX_SCHEDULE_DEPTH + 1):
        s = parse_schedule(chain(depth, leaf, layout))
        assert s.cycles_momentum == (leaf in ("one_cycle", "cyclic"))
        for t in STEPS:
            # one node per level at most, and one leaf: no more than depth + 1 calls
            assert counter.count(lambda: s.lr(t, 0.1)) <= depth + 1  # noqa: B023
            assert counter.count(lambda: s.momentum(t)) <= depth + 1  # noqa: B023
        assert counter.count(lambda: s.momenta(30)) <= 30 * (depth + 1)  # noqa: B023


@pytest.mark.parametrize("layout", ["inner_first", "inner_last", "middle"])
@pytest.mark.parametrize("leaf", ["one_cycle", "cyclic", "quiet", "const"])
def test_evaluation_gives_the_previous_numbers(leaf: str, layout: str) -> None:
    for depth in range(1, 6):  # the reference is exponential in depth
        s = parse_schedule(chain(depth, leaf, layout))
        for t in [*range(60), 10**6]:
            assert s.lr(t, 0.1) == ref_lr(s, t, 0.1)
            assert s.momentum(t) == ref_momentum(s, t)


def test_mixed_sequence_gives_the_previous_numbers() -> None:
    spec = {
        "name": "sequential",
        "schedulers": [
            {"name": "linear", "start_factor": 0.1, "total_iters": 4},
            {**CYCLIC, "warmup": {"steps": 2}},
            chain(2, "quiet", "middle"),
            {"name": "exponential", "gamma": 0.9},
            chain(2, "one_cycle", "inner_last"),
            CONSTANT,
        ],
        "milestones": [3, 3, 12, 20, 30],
    }
    s = parse_schedule(spec)
    # itself, linear, cyclic, a 2-level 'middle' chain (1 + 1 + (1 + 3) + 1), exponential,
    # a 2-level 'inner_last' chain (1 + 1 + (1 + 2)), constant
    assert s.nodes == 1 + 1 + 1 + 7 + 1 + 5 + 1
    for t in range(80):
        assert s.lr(t, 0.2) == ref_lr(s, t, 0.2)
        assert s.momentum(t) == ref_momentum(s, t)


def test_cycles_momentum_evaluates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> Any:
        raise AssertionError("evaluated")

    s = parse_schedule(chain(MAX_SCHEDULE_DEPTH, "one_cycle", "middle"))
    quiet = parse_schedule(chain(MAX_SCHEDULE_DEPTH, "quiet", "middle"))
    for cls in (OneCycleSchedule, CyclicSchedule, SequentialSchedule, ConstantSchedule):
        monkeypatch.setattr(cls, "value", boom)
    for cls in (OneCycleSchedule, CyclicSchedule, SequentialSchedule):
        monkeypatch.setattr(cls, "momentum_value", boom)
    assert s.cycles_momentum is True
    assert quiet.cycles_momentum is False
    assert quiet.momenta(10) is None
    assert s.nodes == quiet.nodes == 1 + 3 * MAX_SCHEDULE_DEPTH


def test_nodes_and_cycles_momentum_of_leaves() -> None:
    assert parse_schedule(CONSTANT).nodes == 1
    assert parse_schedule(CONSTANT).cycles_momentum is False
    assert parse_schedule(ONE_CYCLE).cycles_momentum is True
    assert parse_schedule({**ONE_CYCLE, "cycle_momentum": False}).cycles_momentum is False
    assert parse_schedule(CYCLIC_QUIET).cycles_momentum is False
    for t in (0, 5, 10**9):
        assert (parse_schedule(ONE_CYCLE).momentum(t) is not None) is True
        assert parse_schedule(CYCLIC_QUIET).momentum(t) is None


# --- caps on the raw spec --------------------------------------------------------------


def nested(depth: int, leaf: Any = None) -> Any:
    """`depth` sequential levels around `leaf`, built iteratively."""
    spec: Any = {"name": "constant"} if leaf is None else leaf
    for _ in range(depth):
        spec = {"name": "sequential", "schedulers": [spec], "milestones": []}
    return spec


def refusal(data: Any) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(data)
    return info.value


def test_depth_at_the_limit_is_accepted() -> None:
    s = parse_schedule(nested(MAX_SCHEDULE_DEPTH))
    assert s.nodes == MAX_SCHEDULE_DEPTH + 1
    assert s.lr(3, 0.1) == pytest.approx(0.1 / 3)


@pytest.mark.parametrize("depth", [MAX_SCHEDULE_DEPTH + 1, 23])
def test_depth_over_the_limit_is_refused(depth: int) -> None:
    exc = refusal(nested(depth))
    assert len(exc.errors) == 1
    error = exc.errors[0]
    assert error["msg"].startswith(
        f"schedule nesting depth {depth} is over the limit of {MAX_SCHEDULE_DEPTH}"
    )
    # the first sequential too deep: under 8 levels of ("schedulers", 0)
    assert error["loc"] == ("schedulers", 0) * MAX_SCHEDULE_DEPTH
    assert "depth" in str(exc)


def test_depth_100000_is_refused_without_recursing() -> None:
    exc = refusal(nested(100_000))
    assert "nesting depth" in exc.errors[0]["msg"]
    assert exc.errors[0]["loc"] == ("schedulers", 0) * MAX_SCHEDULE_DEPTH
    assert any("schedules" in e["msg"] for e in exc.errors[1:])  # and too many of them


def test_depth_loc_points_at_the_deep_branch() -> None:
    deep = nested(MAX_SCHEDULE_DEPTH)  # 8 levels inside a sequential's second child
    spec = {
        "name": "sequential",
        "schedulers": [{"name": "constant"}, deep],
        "milestones": [5],
    }
    exc = refusal(spec)
    assert exc.errors[0]["loc"] == ("schedulers", 1) + ("schedulers", 0) * 7
    assert exc.errors[0]["msg"].startswith("schedule nesting depth 9 ")


def test_node_count_is_capped() -> None:
    flat = {
        "name": "sequential",
        "schedulers": [{"name": "constant"}] * (MAX_SCHEDULE_NODES - 1),
        "milestones": list(range(MAX_SCHEDULE_NODES - 2)),
    }
    assert parse_schedule(flat).nodes == MAX_SCHEDULE_NODES
    over = {
        **flat,
        "schedulers": [{"name": "constant"}] * MAX_SCHEDULE_NODES,
        "milestones": list(range(MAX_SCHEDULE_NODES - 1)),
    }
    exc = refusal(over)
    assert exc.errors == [
        {
            "loc": ("schedulers",),
            "msg": f"the spec holds {MAX_SCHEDULE_NODES + 1} schedules (nested ones "
            f"included), over the limit of {MAX_SCHEDULE_NODES}",
        }
    ]
    # nested ones count too
    two = {"name": "sequential", "schedulers": [flat, flat], "milestones": [10]}
    assert "over the limit of 32" in str(refusal(two))


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"name": "multistep", "milestones": list(range(MAX_SCHEDULE_LIST + 1))}, ("milestones",)),
        (
            {
                "name": "piecewise_constant",
                "boundaries": list(range(MAX_SCHEDULE_LIST + 1)),
                "values": [0.1] * (MAX_SCHEDULE_LIST + 2),
            },
            ("boundaries",),
        ),
        (
            {
                "name": "sequential",
                "schedulers": [{"name": "constant"}],
                "milestones": [0] * (MAX_SCHEDULE_LIST + 1),
            },
            ("milestones",),
        ),
        (
            {
                "name": "sequential",
                "schedulers": [{"name": "constant"}] * (MAX_SCHEDULE_LIST + 1),
                "milestones": [],
            },
            ("schedulers",),
        ),
        (
            nested(2, {"name": "multistep", "milestones": [1] * (MAX_SCHEDULE_LIST + 1)}),
            ("schedulers", 0, "schedulers", 0, "milestones"),
        ),
    ],
)
def test_long_lists_are_refused(spec: dict[str, Any], loc: tuple[Any, ...]) -> None:
    exc = refusal(spec)
    assert exc.errors[0]["loc"] == loc
    assert f"over the limit of {MAX_SCHEDULE_LIST}" in exc.errors[0]["msg"]


def test_lists_at_the_limit_are_accepted() -> None:
    s = parse_schedule({"name": "multistep", "milestones": list(range(MAX_SCHEDULE_LIST))})
    assert s.lr(MAX_SCHEDULE_LIST, 1.0) == 0.0  # 0.1 ** 10,000 underflows to 0


def test_step_counts_are_capped_at_the_last_reachable_step() -> None:
    for spec, loc in [
        ({"name": "cosine", "T_max": MAX_STEP + 1}, ("T_max",)),
        ({"name": "step", "step_size": 10**400}, ("step_size",)),
        ({"name": "multistep", "milestones": [2**63]}, ("milestones", 0)),
        ({"name": "cosine_decay", "decay_steps": 10**400}, ("decay_steps",)),
        ({"name": "constant", "warmup": {"steps": 2**64}}, ("warmup", "steps")),
    ]:
        assert refusal(spec).errors[0]["loc"] == loc
    assert parse_schedule({"name": "cosine", "T_max": MAX_STEP}).lr(MAX_STEP, 0.1) >= 0.0


def deep_list(depth: int) -> Any:
    junk: Any = []
    for _ in range(depth):
        junk = [junk]
    return junk


def deep_dict(depth: int) -> Any:
    junk: Any = {}
    for _ in range(depth):
        junk = {"x": junk}
    return junk


JUNK = [
    [],
    [1, 2],
    3,
    "sequential",
    None,
    deep_list(100_000),
    deep_dict(100_000),
    {"name": 3},
    {"name": ["sequential"]},
    {"name": "sequential"},
    {"name": "sequential", "schedulers": None, "milestones": None},
    {"name": "sequential", "schedulers": "abc", "milestones": []},
    {"name": "sequential", "schedulers": [1, "x", None, []], "milestones": [1, 2, 3]},
    {"name": "sequential", "schedulers": [{}], "milestones": []},
    {"name": "sequential", "schedulers": [deep_dict(100_000)], "milestones": []},
    {"name": "sequential", "schedulers": [deep_list(100_000)], "milestones": []},
    {"name": "sequential", "schedulers": [{"name": "constant"}], "milestones": deep_list(10**5)},
    {"name": "step", "step_size": deep_list(100_000)},
    {"name": "step", "step_size": 1, "warmup": deep_dict(100_000)},
    {"name": "step", "step_size": 1, "extra": deep_dict(100_000)},
    {"name": "multistep", "milestones": [deep_list(100_000)]},
    {"name": "cyclic", "base_lr": 0.1, "max_lr": deep_dict(100_000)},
    nested(50, {"name": "nope"}),
    nested(5, [1, 2, 3]),
    nested(5, deep_dict(100_000)),
    nested(3, {"name": "plateau"}),
    {"name": "step", "step_size": 1, **{f"k{i}": i for i in range(20_000)}},
]


@pytest.mark.parametrize("junk", JUNK, ids=range(len(JUNK)))
def test_junk_raises_only_schedule_error(junk: Any) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(junk)
    assert info.value.errors
    assert str(info.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "schedulers", "milestones", "gamma", "x", "warmup", "steps"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=30,
)
NAMES = st.sampled_from([*sorted(SCHEDULES), "nope"])


@st.composite
def junk_specs(draw: st.DrawFn) -> Any:
    """A JSON-like value, often shaped a bit like a schedule spec."""
    if draw(st.booleans()):
        return draw(JSON)
    spec: dict[str, Any] = {"name": draw(NAMES)}
    for key in draw(st.lists(st.sampled_from(["schedulers", "milestones", "gamma", "x"]))):
        spec[key] = (
            draw(st.lists(JSON | junk_specs(), max_size=3)) if draw(st.booleans()) else draw(JSON)
        )
    return spec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk_specs())
def test_any_junk_raises_only_schedule_error(junk: Any) -> None:
    error: ScheduleError | None = None
    try:
        s = parse_schedule(junk)
    except ScheduleError as exc:
        error = exc
    if error is not None:
        assert error.errors
    else:
        assert isinstance(s, Schedule)


# --- bounded rates ---------------------------------------------------------------------

RATE = st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 1e300, 1e308]), st.floats(0.0, 1e308))
GROWTH = st.one_of(
    st.sampled_from([0.0, 0.1, 0.9, 1.0, 1.0 + 2**-52, 1.01, 1.1, 2.0, 10.0, 1e300]),
    st.floats(0.0, 3.0),
)
UNIT = st.floats(0.0, 1.0)
STEPS_ = st.one_of(st.integers(1, 50), st.integers(1, 10**6), st.sampled_from([2**40, 2**62]))
BIG = st.one_of(st.floats(0.0, 10.0), st.sampled_from([1e300, 1e308]))


def leaf_specs(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Valid specs of schedule `name` (may still be refused by a validator: filtered)."""
    s = st.fixed_dictionaries
    by_name: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "step": s({"step_size": STEPS_, "gamma": GROWTH}),
        "multistep": s(
            {
                "milestones": st.lists(st.integers(0, 2000), max_size=8)
                | st.just(list(range(400))),
                "gamma": GROWTH,
            }
        ),
        "exponential": s({"gamma": GROWTH}),
        "constant": s({"factor": UNIT, "total_iters": st.integers(0, 100)}),
        "cosine": s({"T_max": STEPS_, "eta_min": RATE}),
        "cosine_restarts": s(
            {"T_0": STEPS_, "T_mult": st.integers(1, 4) | st.just(2**40), "eta_min": RATE}
        ),
        "linear": s(
            {
                "start_factor": st.floats(1e-9, 1.0),
                "end_factor": UNIT,
                "total_iters": STEPS_,
            }
        ),
        "polynomial": s({"total_iters": STEPS_, "power": BIG}),
        "cyclic": s(
            {
                "base_lr": RATE,
                "max_lr": RATE,
                "step_size_up": STEPS_,
                "step_size_down": st.none() | st.integers(0, 100),
                "mode": st.sampled_from(["triangular", "triangular2", "exp_range"]),
                "gamma": UNIT,
                "cycle_momentum": st.booleans(),
                "base_momentum": st.floats(0.0, 0.999),
                "max_momentum": st.floats(0.0, 0.999),
            }
        ),
        "one_cycle": s(
            {
                "max_lr": RATE,
                "total_steps": st.integers(2, 200) | st.just(2**62),
                "pct_start": UNIT,
                "anneal_strategy": st.sampled_from(["cos", "linear"]),
                "three_phase": st.booleans(),
                "div_factor": st.floats(1e-3, 1e3) | st.just(1e-310),
                "final_div_factor": st.floats(1e-3, 1e5) | st.just(1e-300),
                "base_momentum": st.floats(0.0, 0.999),
                "max_momentum": st.floats(0.0, 0.999),
            }
        ),
        "plateau": s({"min_lr": RATE}),
        "exponential_decay": s(
            {"decay_steps": STEPS_, "decay_rate": UNIT, "staircase": st.booleans()}
        ),
        "natural_exp_decay": s(
            {"decay_steps": STEPS_, "decay_rate": RATE, "staircase": st.booleans()}
        ),
        "inverse_time_decay": s(
            {"decay_steps": STEPS_, "decay_rate": RATE, "staircase": st.booleans()}
        ),
        "polynomial_decay": s(
            {
                "decay_steps": STEPS_,
                "end_learning_rate": RATE,
                "power": BIG,
                "cycle": st.booleans(),
            }
        ),
        "piecewise_constant": st.lists(st.integers(0, 5000), min_size=1, max_size=6, unique=True)
        .map(sorted)
        .flatmap(
            lambda b: s(
                {
                    "boundaries": st.just(b),
                    "values": st.lists(RATE, min_size=len(b) + 1, max_size=len(b) + 1),
                }
            )
        ),
        "cosine_decay": s({"decay_steps": STEPS_, "alpha": UNIT}),
        "cosine_decay_restarts": s(
            {
                "first_decay_steps": STEPS_,
                "t_mul": st.floats(1.0, 4.0) | st.sampled_from([1.0 + 2**-52, 1e300]),
                "m_mul": UNIT,
                "alpha": UNIT,
            }
        ),
        "linear_cosine_decay": s(
            {
                "decay_steps": STEPS_,
                "num_periods": st.floats(0.0, 10.0),
                "alpha": RATE,
                "beta": RATE,
            }
        ),
        "noisy_linear_cosine_decay": s(
            {
                "decay_steps": STEPS_,
                "initial_variance": st.floats(0.0, 4.0) | st.just(1e300),
                "variance_decay": st.floats(0.0, 2.0) | st.just(1e308),
                "num_periods": st.floats(0.0, 10.0),
                "alpha": RATE,
                "beta": RATE,
                "seed": st.integers(0, 2**32),
            }
        ),
    }
    if name not in by_name:
        raise AssertionError(f"no strategy for {name}")
    warmup = st.none() | st.fixed_dictionaries({"steps": st.integers(1, 100), "start_factor": UNIT})
    return st.tuples(by_name[name], warmup).map(
        lambda pair: {"name": name, **pair[0], **({"warmup": pair[1]} if pair[1] else {})}
    )


def test_every_schedule_has_a_strategy() -> None:
    for name in SCHEDULES:
        if name != "sequential":
            leaf_specs(name)


STATELESS = sorted(n for n, cls in SCHEDULES.items() if n != "sequential" and not cls.stateful)


@st.composite
def sequential_specs(draw: st.DrawFn, depth: int = 2) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    children = []
    for _ in range(n):
        if depth > 1 and draw(st.integers(0, 3)) == 0:
            children.append(draw(sequential_specs(depth - 1)))
        else:
            children.append(draw(leaf_specs(draw(st.sampled_from(STATELESS)))))
    milestones = sorted(draw(st.lists(st.integers(0, 3000), min_size=n - 1, max_size=n - 1)))
    return {"name": "sequential", "schedulers": children, "milestones": milestones}


def specs() -> st.SearchStrategy[dict[str, Any]]:
    leaves = st.sampled_from(sorted(n for n in SCHEDULES if n != "sequential")).flatmap(leaf_specs)
    return st.one_of(leaves, sequential_specs(), sequential_specs(3))


def sample_steps(s: Schedule, offset: int = 0) -> Iterator[int]:
    """Steps where a schedule's rate is at its extremes: its start, warm-up end, every
    milestone +- 1 (nested ones at their absolute place), its periods' ends."""
    yield from (offset, offset + 1)
    o = offset + s.warmup_steps
    yield from (o - 1, o, o + 1)
    if isinstance(s, SequentialSchedule):
        for j, child in enumerate(s.schedulers):
            first = s.milestones[j - 1] if j > 0 else 0
            yield from sample_steps(child, o + first)
            if j < len(s.milestones):
                yield from (o + s.milestones[j] + d for d in (-1, 0, 1))
        return
    for field in (
        "step_size",
        "total_iters",
        "T_max",
        "T_0",
        "step_size_up",
        "total_steps",
        "decay_steps",
        "first_decay_steps",
    ):
        value = getattr(s, field, None)
        if isinstance(value, int):
            yield from (o + value + d for d in (-1, 0, 1))
    for field in ("milestones", "boundaries"):
        values = getattr(s, field, None) or []
        for m in [*values[:3], *values[-3:]]:
            yield from (o + m + d for d in (-1, 0, 1))
    if isinstance(s, OneCycleSchedule):
        for end, *_ in s._phases():
            yield from (o + math.floor(end) + d for d in (0, 1))


def steps_of(s: Schedule) -> list[int]:
    return sorted({t for t in [*FAR, *sample_steps(s)] if 0 <= t <= MAX_STEP})


def justified(s: Schedule, base_lr: float, exc: ScheduleError, steps: list[int]) -> bool:
    """A refusal is right when some reachable rate is not finite, or when the rate grows
    without bound (the message naming the parameter at fault)."""
    error = exc.errors[0]
    if "without bound" in error["msg"]:
        param = error["loc"][-1]
        return param in ("gamma", "decay_rate") and error["msg"].startswith(f"{param} ")
    if any(not math.isfinite(s.lr(t, base_lr)) for t in steps):
        return True
    return noisy_bound_overflows(s, base_lr)


def noisy_bound_overflows(s: Schedule, base_lr: float) -> bool:
    """noisy_linear_cosine_decay is refused when its bound (the draw clipped at 40 sigma)
    overflows, even if no draw goes that far (numpy's stay below 14 sigma)."""
    nodes = [s]
    while nodes:
        node = nodes.pop()
        if isinstance(node, SequentialSchedule):
            nodes += node.schedulers
        elif isinstance(node, NoisyLinearCosineDecaySchedule):
            factor = node.alpha + 1 + NOISE_CLIP * math.sqrt(node.initial_variance) + node.beta
            if base_lr > 0 and base_lr * factor >= 1e308:
                return True
    return False


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), base_lr=RATE)
def test_check_rates_accepts_only_finite_bounded_rates(
    spec: dict[str, Any], base_lr: float
) -> None:
    try:
        s = parse_schedule(spec)
    except ScheduleError:
        return  # e.g. one_cycle's pct_start * total_steps == 1
    peak = s.peak(base_lr)
    assert not math.isnan(peak)
    steps = steps_of(s)
    error: ScheduleError | None = None
    try:
        check_rates(s, base_lr)
    except ScheduleError as exc:
        error = exc
    if error is not None:
        assert not math.isfinite(peak)
        assert justified(s, base_lr, error, steps), (error.errors, peak)
        return
    assert math.isfinite(peak)
    state = s.initial_state(base_lr)
    for t in steps:
        lr = s.lr(t, base_lr, state)
        assert math.isfinite(lr), (t, lr)
        assert lr >= 0.0, (t, lr)
        assert lr <= peak * (1 + 1e-12), (t, lr, peak)
        m = s.momentum(t)
        assert (m is not None) == s.cycles_momentum
        if m is not None:
            assert 0.0 <= m < 1.0, (t, m)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), base_lr=RATE, steps=st.integers(1, 4000))
def test_peak_over_a_horizon_bounds_the_rates_in_it(
    spec: dict[str, Any], base_lr: float, steps: int
) -> None:
    try:
        s = parse_schedule(spec)
    except ScheduleError:
        return
    peak = s.peak(base_lr, steps)
    assert not math.isnan(peak)
    assert peak <= s.peak(base_lr) or not math.isfinite(s.peak(base_lr))
    if math.isfinite(peak):
        for t in [t for t in steps_of(s) if t < steps] + [steps - 1]:
            lr = s.lr(t, base_lr)
            assert 0.0 <= lr <= peak * (1 + 1e-12), (t, lr, peak)


def refused(spec: dict[str, Any], base_lr: float) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        check_rates(parse_schedule(spec), base_lr)
    return info.value


def test_exponential_gamma_1e300_is_refused() -> None:
    exc = refused({"name": "exponential", "gamma": 1e300}, 0.1)
    assert exc.errors == [
        {
            "loc": ("gamma",),
            "msg": "gamma 1e300 > 1 makes the rate grow without bound (it passes 1.8e308 at "
            "step 2); use it inside a sequential schedule with a milestone, or a gamma <= 1",
        }
    ]
    # and in a request, under the schedule's place
    with pytest.raises(ScheduleError) as info:
        check_rates(parse_schedule({"name": "exponential", "gamma": 1e300}), 0.1, ("schedule",))
    assert info.value.errors[0]["loc"] == ("schedule", "gamma")


def test_exponential_gamma_1_is_accepted() -> None:
    s = parse_schedule({"name": "exponential", "gamma": 1.0})
    check_rates(s, 0.1)
    assert s.peak(0.1) == 0.1
    assert all(s.lr(t, 0.1) == 0.1 for t in FAR)


def test_exponential_gamma_11_names_the_step_it_passes_the_float_range() -> None:
    exc = refused({"name": "exponential", "gamma": 1.1}, 1.0)
    assert exc.errors[0]["msg"].startswith(
        "gamma 1.1 > 1 makes the rate grow without bound (it passes 1.8e308 at step 7448)"
    )
    s = parse_schedule({"name": "exponential", "gamma": 1.1})
    assert math.isfinite(s.lr(7447, 1.0))
    assert s.lr(7448, 1.0) == math.inf  # not OverflowError
    with_warmup = {"name": "exponential", "gamma": 1.1, "warmup": {"steps": 10}}
    assert "at step 7458)" in refused(with_warmup, 1.0).errors[0]["msg"]


def test_gamma_10_with_lr_1e308_is_refused() -> None:
    exc = refused({"name": "exponential", "gamma": 10.0}, 1e308)
    assert "at step 1)" in exc.errors[0]["msg"]
    exc = refused({"name": "multistep", "milestones": [5], "gamma": 10.0}, 1e308)
    assert exc.errors == [
        {
            "loc": ("gamma",),
            "msg": "the rate overflows to infinity at step 5 (base lr 1e308 x max factor 10)",
        }
    ]


def test_multistep_gamma_10_with_400_milestones_is_refused() -> None:
    spec = {"name": "multistep", "milestones": list(range(400)), "gamma": 10.0}
    exc = refused(spec, 0.1)
    assert exc.errors[0]["loc"] == ("gamma",)
    assert exc.errors[0]["msg"] == (
        "the rate overflows to infinity at step 309 (base lr 0.1 x max factor 10 ** 310)"
    )
    s = parse_schedule(spec)
    assert s.lr(309, 0.1) == math.inf
    assert s.lr(2**62, 0.1) == math.inf  # no OverflowError
    # 300 milestones stay in range: accepted, peak at the last milestone
    ok = parse_schedule({**spec, "milestones": list(range(300))})
    check_rates(ok, 0.1)
    assert ok.peak(0.1) == ok.lr(299, 0.1) == ok.lr(2**62, 0.1)
    assert 1e298 < ok.peak(0.1) < 1e300


def test_growth_before_a_milestone_is_accepted() -> None:
    spec = {
        "name": "sequential",
        "schedulers": [{"name": "exponential", "gamma": 1.1}, {"name": "cosine", "T_max": 50}],
        "milestones": [10],
    }
    s = parse_schedule(spec)
    check_rates(s, 0.1)
    assert s.peak(0.1) == 0.1 * 1.1**9
    assert max(s.lr(t, 0.1) for t in range(200)) == s.peak(0.1)
    # the same schedule last, or alone, is refused
    last = {**spec, "schedulers": spec["schedulers"][::-1]}
    assert refused(last, 0.1).errors[0]["loc"] == ("schedulers", 1, "gamma")
    assert "without bound" in refused(spec["schedulers"][0], 0.1).errors[0]["msg"]
    # and before a milestone too far out it overflows: refused, naming the step
    far = {**spec, "milestones": [10_000]}
    exc = refused(far, 0.1)
    assert exc.errors[0]["loc"] == ("schedulers", 0, "gamma")
    assert exc.errors[0]["msg"].startswith("the rate overflows to infinity at step 7472 ")


def test_nested_growth_is_found_at_its_place() -> None:
    inner = {
        "name": "sequential",
        "schedulers": [{"name": "constant"}, {"name": "step", "step_size": 5, "gamma": 2.0}],
        "milestones": [3],
    }
    outer = {"name": "sequential", "schedulers": [{"name": "linear"}, inner], "milestones": [4]}
    exc = refused(outer, 0.1)
    assert exc.errors[0]["loc"] == ("schedulers", 1, "schedulers", 1, "gamma")
    # 0.1 * 2 ** k passes the float range at k = 1028: step 4 + 3 + 5 * 1028
    assert "(it passes 1.8e308 at step 5147)" in exc.errors[0]["msg"]
    # before a milestone it is fine
    ok = {"name": "sequential", "schedulers": [outer, {"name": "constant"}], "milestones": [100]}
    check_rates(parse_schedule(ok), 0.1)
    assert parse_schedule(ok).peak(0.1) == 0.1 * 2.0**18  # steps 7 .. 99: k up to 18


def test_step_gamma_2_is_refused() -> None:
    exc = refused({"name": "step", "step_size": 30, "gamma": 2.0}, 0.1)
    assert exc.errors[0]["loc"] == ("gamma",)
    assert "grow without bound" in exc.errors[0]["msg"]


def test_cyclic_exp_range_gamma_above_1_is_refused() -> None:
    spec = {"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "mode": "exp_range", "gamma": 1.01}
    with pytest.raises(ScheduleError) as info:
        parse_schedule(spec)
    assert info.value.errors[0]["loc"] == ("gamma",)
    # built around validation, the peak still says it grows without bound
    s = CyclicSchedule.model_construct(**{**spec, "scale_mode": "iterations"})
    assert s.peak(0.1) == math.inf


def test_one_cycle_div_factor_overflow_is_refused() -> None:
    spec = {"name": "one_cycle", "max_lr": 1.0, "total_steps": 100, "div_factor": 1e-310}
    exc = refused(spec, 0.1)
    assert exc.errors[0]["loc"] == ("div_factor",)
    s = parse_schedule(spec)
    assert not math.isfinite(s.lr(0, 0.1))  # what it would have given
    final = {"name": "one_cycle", "max_lr": 1e300, "total_steps": 100, "final_div_factor": 1e-300}
    assert refused(final, 0.1).errors[0]["loc"] == ("final_div_factor",)


def test_zero_base_lr_never_grows() -> None:
    s = parse_schedule({"name": "exponential", "gamma": 2.0})
    check_rates(s, 0.0)
    assert s.peak(0.0) == 0.0
    assert all(s.lr(t, 0.0) == 0.0 for t in FAR)


@pytest.mark.parametrize("base_lr", [-0.1, math.inf, math.nan])
def test_a_bad_base_lr_is_refused(base_lr: float) -> None:
    with pytest.raises(ScheduleError) as info:
        check_rates(parse_schedule({"name": "constant"}), base_lr, ("optimizer", "lr"))
    assert info.value.errors[0]["loc"] == ("optimizer", "lr")


def test_peak_of_no_step_is_zero() -> None:
    s = parse_schedule({"name": "exponential", "gamma": 2.0, "warmup": {"steps": 5}})
    assert s.peak(0.1, 0) == 0.0
    assert s.peak(0.1, 3) == s.lr(2, 0.1)
    assert s.peak(0.1, 5) == s.lr(4, 0.1)
    assert s.peak(0.1, 8) == s.lr(7, 0.1) == 0.1 * 4
    assert s.peak(0.1) == math.inf


# --- far-away steps never raise ------------------------------------------------------

FAR_SPECS: list[dict[str, Any]] = [
    {"name": "step", "step_size": 1, "gamma": 2.0},
    {"name": "multistep", "milestones": [0, 1], "gamma": 1e300},
    {"name": "exponential", "gamma": 1e300},
    {"name": "cosine", "T_max": 1},
    {"name": "cosine", "T_max": 10**9, "eta_min": 0.05},
    {"name": "cosine", "T_max": 2**62, "eta_min": 0.05},
    {"name": "cosine", "T_max": 12_345, "eta_min": 1e308},
    {"name": "cosine_restarts", "T_0": 1, "T_mult": 2},
    {"name": "cosine_restarts", "T_0": 3, "T_mult": MAX_STEP, "eta_min": 1e308},
    {"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "step_size_up": 1, "mode": "triangular2"},
    {"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "step_size_down": 0, "mode": "exp_range"},
    {"name": "one_cycle", "max_lr": 1.0, "total_steps": MAX_STEP, "three_phase": True},
    {"name": "one_cycle", "max_lr": 1.0, "epochs": MAX_STEP, "steps_per_epoch": MAX_STEP},
    {"name": "polynomial_decay", "decay_steps": 3, "cycle": True, "power": 0.5},
    {"name": "polynomial_decay", "decay_steps": 7, "cycle": True, "power": 1e308},
    {"name": "cosine_decay_restarts", "first_decay_steps": 1, "t_mul": 1e300},
    {"name": "cosine_decay_restarts", "first_decay_steps": 1, "t_mul": 1.0 + 2**-52},
    {"name": "cosine_decay_restarts", "first_decay_steps": 1, "t_mul": 1.0, "m_mul": 0.5},
    {"name": "inverse_time_decay", "decay_steps": 1, "decay_rate": 1e308},
    {"name": "natural_exp_decay", "decay_steps": 1, "decay_rate": 1e308},
    {"name": "noisy_linear_cosine_decay", "decay_steps": MAX_STEP, "variance_decay": 1e308},
    {"name": "linear_cosine_decay", "decay_steps": 1, "alpha": 1e308, "beta": 1e308},
]


@pytest.mark.parametrize("spec", FAR_SPECS, ids=[s["name"] for s in FAR_SPECS])
def test_far_away_steps_never_raise(spec: dict[str, Any]) -> None:
    s = parse_schedule(spec)
    peak = s.peak(0.1)
    for t in [*FAR, *range(2**62 - 3, 2**62 + 3), *range(2**53 - 3, 2**53 + 3)]:
        lr = s.lr(t, 0.1)
        assert not math.isnan(lr)
        assert lr >= 0.0
        if math.isfinite(peak):
            assert lr <= peak * (1 + 1e-12)
        m = s.momentum(t)
        assert m is None or 0.0 <= m < 1.0
