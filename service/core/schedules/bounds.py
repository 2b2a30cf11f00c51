"""The bounded-rate rule: a schedule must give a finite rate >= 0 at every step it can
reach, or be refused (at session create and schedule preview, with 422).

`check_rates(schedule, base_lr)` asks the schedule for its peak rate (`Schedule.peak`,
analytic per family, never raising) and refuses it when the peak is not finite, with a
ScheduleError naming the field at fault: a growth factor above 1 on a schedule that runs
without end (`gamma 1.1 > 1 makes the rate grow without bound ...`), or a rate that
passes the float range within the steps it runs (`the rate overflows to infinity at
step 5 (base lr 1e308 x max factor 10)`). Rates are never negative by construction
(every formula's parameters are >= 0, and `noisy_linear_cosine_decay` clamps at 0).
"""

from __future__ import annotations

import math

from service.core.errors import ScheduleError
from service.core.schedules.base import Loc, Schedule


def check_rates(schedule: Schedule, base_lr: float, loc: Loc = ()) -> None:
    """Refuse `schedule` run on the optimizer's `base_lr` if its rate is not finite at
    some step (it grows without bound, or past the float range).

    Raises ScheduleError with `loc` (where the schedule sits in the request, e.g.
    `("schedule",)`) followed by the field at fault inside it (`("gamma",)`,
    `("schedulers", 0, "gamma")`); a `base_lr` that is not a finite number >= 0 is
    refused at `loc` itself.
    """
    if (
        isinstance(base_lr, bool)
        or not isinstance(base_lr, (int, float))
        or not math.isfinite(base_lr)
        or base_lr < 0
    ):
        raise ScheduleError(
            [{"loc": loc, "msg": f"the base lr must be a finite number >= 0: got {base_lr!r}"}]
        )
    problem = schedule.rate_problem(float(base_lr))
    if problem is None:
        return
    where, msg = problem
    raise ScheduleError([{"loc": (*loc, *where), "msg": msg}])


__all__ = ["check_rates"]
