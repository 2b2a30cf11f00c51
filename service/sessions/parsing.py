"""Parsing of create and step bodies (JSON or binary) into NumPy, validated.

Everything here runs before anything is stored or an idempotency key is claimed
(docs/design.md, decision 5): `parse_create` builds the session's `Spec` and flat params,
`parse_step` a `StepInput` checked against the session's layout (names, shapes,
numbers, finiteness unless the session skips non-finite steps) and its loss.

A schedule is refused (422) unless its rate is finite and >= 0 at every step it can
reach on the optimizer's `lr` (`check_rates`), at create, at import (which goes through
`build_spec`) and at preview; a preview is also held to `MAX_PREVIEW_COST` schedule
evaluations (`check_preview`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from service.core import FlatLayout, GradientTransforms, find_nonfinite
from service.core.averaging import parse_ema, parse_swa
from service.core.consistency import parse_consistency
from service.core.errors import LayoutError, SpecError
from service.core.federated import get_server_optimizer, parse_federated, parse_server_hyper
from service.core.lr_finder import parse_lr_finder_config
from service.core.optim import Hyper, get_optimizer, parse_hyper
from service.core.schedules import Schedule, check_rates, parse_schedule
from service.core.schedules.momentum import supports_momentum
from service.sessions import codecs
from service.sessions.errors import Invalid, field_error, invalid, layout_error, spec_error
from service.sessions.requests import CreateSession, StepRequest
from service.sessions.spec import DEFAULT_HISTORY, Limits, Spec


@dataclass(frozen=True, slots=True)
class StepInput:
    grads: np.ndarray
    loss: float | None
    ret: str
    #: tensors the request gave no gradient for (`skip_missing`), in layout order
    missing: tuple[str, ...] = ()
    #: the version the gradient was computed on (None: not said)
    base_version: int | None = None
    #: seconds a sync push waits for its step (0: answer at once)
    wait: float = 0.0


#: creation fields carried in binary `__metadata__` as JSON strings
_JSON_METADATA = (
    *("optimizer", "schedule", "transforms", "lr_finder", "ema", "swa", "consistency"),
    "federated",
)


def parse_create(body: bytes, binary: bool, limits: Limits) -> tuple[Spec, np.ndarray]:
    """A creation body (JSON or binary) as its spec and flat params, validated within
    `limits`."""
    tensors: dict[str, np.ndarray]
    if binary:
        raw, metadata = codecs.load_binary(body, limits.max_tensors)
        data: dict[str, Any] = {"params": {}}
        for name in _JSON_METADATA:
            if name in metadata:
                data[name] = _metadata_json(metadata, name)
        for name in ("dtype", "nonfinite"):
            if name in metadata:
                data[name] = metadata[name]
        if "history" in metadata:
            data["history"] = codecs.metadata_int(metadata, "history", ["body", "history"])
        request = validate_model(CreateSession, data)
        tensors = {n: codecs.binary_tensor(a, ["body", "params", n]) for n, a in raw.items()}
    else:
        request = validate_model(CreateSession, codecs.load_json(body))
        tensors = codecs.json_tensors(request.params, ["body", "params"])  # frees the lists
    spec = build_spec(request, tensors, limits)
    with np.errstate(over="ignore"):
        params = spec.layout.flatten(tensors, spec.dtype)
    if not np.isfinite(params).all():
        count, names = find_nonfinite(params, spec.layout)
        msg = f"holds non-finite values (NaN or inf, or too large for {spec.dtype.name})"
        raise Invalid(
            f"{count} non-finite parameter values in {', '.join(map(repr, names))}",
            [field_error(["body", "params", n], msg) for n in names],
        )
    return spec, params


def build_spec(request: CreateSession, tensors: Mapping[str, np.ndarray], limits: Limits) -> Spec:
    """The spec of a creation request and its tensors (422 on anything invalid)."""
    _check_tensors(tensors, limits)
    federated = _feature(parse_federated, request.federated, "federated")
    hp = _hyper(request.optimizer, federated is not None)
    schedule = _schedule(request.schedule, hp)
    transforms = _transforms(request)
    layout = _layout(tensors, limits)
    history = DEFAULT_HISTORY if request.history is None else request.history
    if not 0 <= history <= limits.max_history:
        raise invalid(["body", "history"], f"must be in [0, {limits.max_history}]: got {history}")
    lr_finder = _feature(parse_lr_finder_config, request.lr_finder, "lr_finder")
    if lr_finder is not None and schedule is not None:
        raise invalid(
            ["body", "schedule"],
            "a range-test session takes its rates from the lr_finder ramp; leave out schedule",
        )
    consistency = _feature(parse_consistency, request.consistency, "consistency")
    if federated is not None:
        for name, value in (("lr_finder", request.lr_finder), ("consistency", request.consistency)):
            if value is not None:
                raise invalid(["body", name], "is not available in a federated session")
    return Spec(
        hp=hp,
        optimizer=(get_optimizer if federated is None else get_server_optimizer)(hp.name),
        schedule=schedule,
        dtype=np.dtype(request.dtype),
        layout=layout,
        transforms=transforms,
        lr_finder=lr_finder,
        ema=_feature(parse_ema, request.ema, "ema"),
        swa=_feature(parse_swa, request.swa, "swa"),
        consistency=consistency,
        history=history,
        federated=federated,
    )


def _check_tensors(tensors: Mapping[str, np.ndarray], limits: Limits) -> None:
    """At least one tensor, at most `limits.max_tensors`, none named `__metadata__`."""
    if not tensors:
        raise invalid(["body", "params"], "must name at least one tensor")
    if len(tensors) > limits.max_tensors:
        raise invalid(
            ["body", "params"],
            f"{len(tensors)} tensors, over this server's limit of {limits.max_tensors}",
        )
    if "__metadata__" in tensors:
        raise invalid(["body", "params", "__metadata__"], "this tensor name is reserved")


def _hyper(data: Mapping[str, Any], federated: bool) -> Hyper:
    """The optimizer's hyperparameters (a server optimizer's in a federated session)."""
    try:
        return (parse_server_hyper if federated else parse_hyper)(data)
    except SpecError as exc:
        raise spec_error(exc, ["body", "optimizer"]) from None


def _schedule(data: Mapping[str, Any] | None, hp: Hyper) -> Schedule | None:
    """The schedule, if any: valid, with finite rates on `hp.lr`, and cycling momentum
    only when the optimizer has momentum or betas."""
    if data is None:
        return None
    try:
        schedule = parse_schedule(data)
        check_rates(schedule, hp.lr)
    except SpecError as exc:
        raise spec_error(exc, ["body", "schedule"]) from None
    if schedule.momentum(0) is not None and not supports_momentum(hp):
        raise invalid(
            ["body", "schedule", "cycle_momentum"],
            f"optimizer {hp.name!r} has neither momentum nor betas to cycle; "
            "set cycle_momentum to false",
        )
    return schedule


def _transforms(request: CreateSession) -> GradientTransforms:
    """The gradient transforms, with the top-level `nonfinite` shorthand folded in (422
    when it contradicts `transforms.nonfinite`)."""
    transforms = request.transforms or GradientTransforms()
    if request.nonfinite is None:
        return transforms
    given = request.transforms is not None and "nonfinite" in transforms.model_fields_set
    if given and transforms.nonfinite != request.nonfinite:
        raise invalid(
            ["body", "nonfinite"],
            f"contradicts transforms.nonfinite ({transforms.nonfinite!r})",
        )
    return transforms.model_copy(update={"nonfinite": request.nonfinite})


def _layout(tensors: Mapping[str, np.ndarray], limits: Limits) -> FlatLayout:
    """The flat layout of the tensors, within `limits.max_params`."""
    try:
        layout = FlatLayout.from_shapes((n, a.shape) for n, a in tensors.items())
    except LayoutError as exc:
        raise layout_error(exc, ["body", "params"]) from None
    if layout.total > limits.max_params:
        raise invalid(
            ["body", "params"],
            f"{layout.total} parameters in all, over this server's limit of {limits.max_params}",
        )
    return layout


#: the most schedule evaluations one preview (or schedule plot) may ask for: its steps
#: times the schedules in its spec (`Schedule.nodes`, nested ones included); about a
#: second of a worker thread's time at the most
MAX_PREVIEW_COST = 2_000_000


def check_preview(schedule: Schedule, lr: float, steps: int) -> None:
    """Refuse (422) a preview of `schedule` on the optimizer's `lr` over `steps` steps
    when a session would refuse the schedule (`check_rates`: its rate is not finite at
    some step it can reach), or when it costs more than `MAX_PREVIEW_COST` evaluations.
    What passes gives a finite rate >= 0 at every step."""
    try:
        check_rates(schedule, lr)
    except SpecError as exc:
        raise spec_error(exc, ["body", "schedule"]) from None
    cost = steps * schedule.nodes
    if cost > MAX_PREVIEW_COST:
        raise invalid(
            ["body", "steps"],
            f"{steps} steps of a spec of {schedule.nodes} schedules is {cost} schedule "
            f"evaluations, over the limit of {MAX_PREVIEW_COST}; ask for at most "
            f"{MAX_PREVIEW_COST // schedule.nodes} steps",
        )


F = TypeVar("F")


def _feature(parse: Callable[[Any], F], data: Any, name: str) -> F:
    """`parse(data)` with a spec error reported under `["body", name, ...]`; None stays
    None unless the parser gives a default for it (consistency)."""
    if data is None and name != "consistency":  # consistency: None is the default
        return None  # type: ignore[return-value]
    try:
        return parse(data)
    except SpecError as exc:
        raise spec_error(exc, ["body", name]) from None


def parse_step(spec: Spec, body: bytes, binary: bool) -> StepInput:
    """A step body (JSON or binary) checked against `spec`, before any write."""
    arrays: dict[str, np.ndarray]
    if binary:
        raw, metadata = codecs.load_binary(body, len(spec.layout.names) + codecs.SPARE_TENSORS)
        arrays = {n: codecs.binary_tensor(a, ["body", "grads", n]) for n, a in raw.items()}
        loss = codecs.metadata_number(metadata, "loss", ["body", "loss"])
        ret = metadata.get("return", "params")
        if ret not in ("params", "updates", "none"):
            raise invalid(["body", "return"], f"must be params, updates or none: got {ret!r}")
        skip_missing = codecs.metadata_bool(metadata, "skip_missing", ["body", "skip_missing"])
        options: dict[str, Any] = {"grads": {}}
        if "base_version" in metadata:
            options["base_version"] = codecs.metadata_int(
                metadata, "base_version", ["body", "base_version"]
            )
        if "wait" in metadata:
            options["wait"] = codecs.metadata_number(metadata, "wait", ["body", "wait"])
        request = validate_model(StepRequest, options)
    else:
        request = validate_model(StepRequest, codecs.load_json(body))
        arrays = codecs.json_tensors(request.grads, ["body", "grads"])  # frees the lists
        loss, ret, skip_missing = request.loss, request.return_, request.skip_missing
    base_version, wait = request.base_version, request.wait
    _check_features(spec, loss, ret, skip_missing, base_version)
    missing: tuple[str, ...] = ()
    if skip_missing:
        missing = tuple(n for n in spec.layout.names if n not in arrays)
        if missing:  # zeros in their segments; `_compute` puts them back afterwards
            zeros = {n: np.zeros(spec.layout[n].shape, spec.dtype) for n in missing}
            arrays = {**arrays, **zeros}
    try:
        with np.errstate(over="ignore"):
            grads = spec.layout.flatten(arrays, spec.dtype)
    except LayoutError as exc:
        raise layout_error(exc, ["body", "grads"]) from None
    # refuse here, before an idempotency key is claimed or a transaction opened
    finite = bool(np.isfinite(grads).all())
    range_test_diverged = spec.lr_finder is not None and not math.isfinite(loss or 0.0)
    if not finite and spec.transforms.nonfinite != "skip" and not range_test_diverged:
        raise nonfinite_grads(*find_nonfinite(grads, spec.layout))
    if finite and loss is not None and not math.isfinite(loss) and spec.lr_finder is None:
        raise invalid(["body", "loss"], f"must be a finite number: got {loss}")
    return StepInput(grads, loss, ret, missing, base_version, wait)


def _check_features(
    spec: Spec, loss: float | None, ret: str, skip_missing: bool, base_version: int | None
) -> None:
    """What the session's training features ask of a step (docs/training.md)."""
    if spec.federated is not None:
        raise invalid(
            ["body"],
            "a federated session takes client updates by round "
            "(POST /v1/sessions/{id}/rounds/{round}/updates), not steps",
        )
    if spec.lr_finder is not None and loss is None:
        raise invalid(["body", "loss"], "a range-test session needs the loss of every step")
    sync = spec.sync
    if sync is not None:
        if base_version is None:
            raise invalid(
                ["body", "base_version"],
                "a sync session needs base_version, the version the gradient was computed on",
            )
        if skip_missing:
            raise invalid(["body", "skip_missing"], "is not available in sync sessions")
        if ret == "updates":
            raise invalid(
                ["body", "return"],
                "updates are not available in sync sessions (a waiting push's update would "
                "span other workers' gradients); ask for params",
            )
    elif base_version is None and getattr(spec.consistency, "max_staleness", None) is not None:
        raise invalid(
            ["body", "base_version"],
            "this session limits staleness (max_staleness): send base_version, the version "
            "the gradient was computed on",
        )


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: Any) -> M:
    """`model` validated from `data`; errors as a 422 naming each field under `body`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = []
        parts: list[str] = []
        for error in exc.errors():
            loc = [p if isinstance(p, int) else str(p) for p in error["loc"]]
            errors.append(field_error(["body", *loc], error["msg"]))
            parts.append(f"{'.'.join(map(str, loc))}: {error['msg']}")
        raise Invalid("; ".join(parts), errors) from None


def nonfinite_grads(count: int, names: list[str]) -> Invalid:
    msg = "holds non-finite values (NaN or inf, or too large for the session's dtype)"
    return Invalid(
        f"{count} non-finite gradient values in {', '.join(map(repr, names))}; nothing was applied",
        [field_error(["body", "grads", n], msg) for n in names],
    )


def _metadata_json(metadata: Mapping[str, str], name: str) -> Any:
    try:
        return orjson.loads(metadata[name])
    except orjson.JSONDecodeError:
        raise invalid(["body", name], "must be JSON written as a string in __metadata__") from None
