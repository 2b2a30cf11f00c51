"""Caps on a schedule spec, checked on the raw data before pydantic builds anything.

A spec comes from a client, so its size is bounded before it is validated: nesting of
`sequential` (each level is a model pydantic builds recursively, and a schedule a step
evaluates), the number of schedules in all, and the length of any list field. The walk
is iterative (no recursion, whatever the nesting of the data), looks only at what a
schedule spec can hold (the mappings in `schedulers` lists, and the list fields of each
spec), and stops after a fixed budget of visited elements, so its cost is bounded for
any input, junk included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import ScheduleError
from service.core.schedules.base import Loc

#: the most `sequential` levels one inside the other (a bare schedule has depth 0)
MAX_SCHEDULE_DEPTH = 8
#: the most schedules in one spec, itself and every nested one included
MAX_SCHEDULE_NODES = 32
#: the most elements of any list field (milestones, boundaries, values, schedulers)
MAX_SCHEDULE_LIST = 10_000

#: the walk stops after visiting this many schedule specs (it reports "at least")
_WALK_BUDGET = 100_000
#: at most this many over-long lists are reported
_MAX_LIST_ERRORS = 10

# A node's place, as a linked list (parent's place, index in its `schedulers`): O(1) per
# node however deep, turned into a loc only for the nodes reported.
_Link = tuple[Any, int] | None


def _loc(link: _Link) -> Loc:
    indices: list[int] = []
    while link is not None:
        link, index = link
        indices.append(index)
    loc: list[str | int] = []
    for index in reversed(indices):
        loc += ["schedulers", index]
    return tuple(loc)


@dataclass(frozen=True, slots=True)
class _Walk:
    """What the walk of a spec found: the deepest `sequential` nesting, the place of the
    first one nested too deep (if any), the schedules visited, whether the budget ran
    out, and the over-long lists (at most `_MAX_LIST_ERRORS`)."""

    deepest: int
    found_too_deep: bool
    too_deep: _Link
    nodes: int
    truncated: bool
    list_errors: list[dict[str, object]]


def _walk(data: object) -> _Walk:
    """Visit the schedule specs of `data` iteratively, within `_WALK_BUDGET` visits."""
    deepest = 0
    too_deep: _Link = None
    found_too_deep = False
    nodes = 0
    truncated = False
    list_errors: list[dict[str, object]] = []
    stack: list[tuple[object, _Link, int]] = [(data, None, 0)]
    while stack:
        node, link, depth = stack.pop()
        nodes += 1
        if nodes > _WALK_BUDGET:
            truncated = True
            break
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            too_long = isinstance(value, (list, tuple)) and len(value) > MAX_SCHEDULE_LIST
            if too_long and len(list_errors) < _MAX_LIST_ERRORS:
                list_errors.append(
                    {
                        "loc": (*_loc(link), key),
                        "msg": f"{key} has {len(value)} elements, over the limit of "
                        f"{MAX_SCHEDULE_LIST}",
                    }
                )
        if node.get("name") != "sequential":
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
        if depth > MAX_SCHEDULE_DEPTH and not found_too_deep:
            found_too_deep, too_deep = True, link
        children = node.get("schedulers")
        if isinstance(children, list) and len(children) <= MAX_SCHEDULE_LIST:
            for i in range(len(children) - 1, -1, -1):
                stack.append((children[i], (link, i), depth))
    return _Walk(deepest, found_too_deep, too_deep, nodes, truncated, list_errors)


def _errors(walk: _Walk, top_is_mapping: bool) -> list[dict[str, object]]:
    """The errors of a walk: nesting too deep, then too many schedules, then the lists."""
    errors: list[dict[str, object]] = []
    at_least = "at least " if walk.truncated else ""
    if walk.found_too_deep:
        errors.append(
            {
                "loc": _loc(walk.too_deep),
                "msg": f"schedule nesting depth {at_least}{walk.deepest} is over the limit of "
                f"{MAX_SCHEDULE_DEPTH} (sequential schedules one inside the other)",
            }
        )
    if walk.nodes > MAX_SCHEDULE_NODES:
        counted = f"more than {_WALK_BUDGET}" if walk.truncated else str(walk.nodes)
        errors.append(
            {
                "loc": ("schedulers",) if top_is_mapping else (),
                "msg": f"the spec holds {counted} schedules (nested ones included), over "
                f"the limit of {MAX_SCHEDULE_NODES}",
            }
        )
    return errors + walk.list_errors


def check_limits(data: object) -> None:
    """Refuse a raw schedule spec over the caps, with a ScheduleError naming each limit
    passed and where: the first `sequential` nested too deep (`loc` its place, e.g.
    `("schedulers", 0, "schedulers", 1, ...)`), too many schedules (`("schedulers",)`),
    or a list too long (`loc` the field). Anything else about the data (its types,
    names, values) is left to validation."""
    errors = _errors(_walk(data), isinstance(data, Mapping))
    if errors:
        raise ScheduleError(errors)
