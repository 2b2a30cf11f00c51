"""Parsing of create and step bodies (JSON or binary) into NumPy, validated.

Everything here runs before anything is stored or an idempotency key is claimed
(DESIGN.md, decision 5): `parse_create` builds the session's `Spec` and flat params,
`parse_step` a `StepInput` checked against the session's layout (names, shapes,
numbers, finiteness unless the session skips non-finite steps) and its loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from service.api import codecs
from service.api.errors import Invalid, field_error, invalid, layout_error, spec_error
from service.api.schemas import CreateSession, StepRequest
from service.api.spec import Spec
from service.core import FlatLayout, GradientTransforms, find_nonfinite
from service.core.errors import LayoutError, SpecError
from service.core.optim import get_optimizer, parse_hyper
from service.core.schedules import parse_schedule
from service.core.schedules.momentum import supports_momentum


@dataclass(frozen=True, slots=True)
class StepInput:
    grads: np.ndarray
    loss: float | None
    ret: str
    #: tensors the request gave no gradient for (`skip_missing`), in layout order
    missing: tuple[str, ...] = ()


def parse_create(body: bytes, binary: bool, max_params: int) -> tuple[Spec, np.ndarray]:
    """A creation body (JSON or binary) as its spec and flat params, validated; at most
    `max_params` parameters in all."""
    tensors: dict[str, np.ndarray]
    if binary:
        raw, metadata = codecs.load_binary(body)
        data: dict[str, Any] = {"params": {}}
        for name in ("optimizer", "schedule", "transforms"):
            if name in metadata:
                data[name] = _metadata_json(metadata, name)
        for name in ("dtype", "nonfinite"):
            if name in metadata:
                data[name] = metadata[name]
        request = _validate(CreateSession, data)
        tensors = {n: codecs.binary_tensor(a, ["body", "params", n]) for n, a in raw.items()}
    else:
        request = _validate(CreateSession, codecs.load_json(body))
        tensors = {
            n: codecs.json_tensor(v, ["body", "params", n]) for n, v in request.params.items()
        }
    spec = build_spec(request, tensors, max_params)
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


def build_spec(request: CreateSession, tensors: Mapping[str, np.ndarray], max_params: int) -> Spec:
    """The spec of a creation request and its tensors (422 on anything invalid)."""
    if not tensors:
        raise invalid(["body", "params"], "must name at least one tensor")
    if "__metadata__" in tensors:
        raise invalid(["body", "params", "__metadata__"], "this tensor name is reserved")
    try:
        hp = parse_hyper(request.optimizer)
    except SpecError as exc:
        raise spec_error(exc, ["body", "optimizer"]) from None
    schedule = None
    if request.schedule is not None:
        try:
            schedule = parse_schedule(request.schedule)
        except SpecError as exc:
            raise spec_error(exc, ["body", "schedule"]) from None
        if schedule.momentum(0) is not None and not supports_momentum(hp):
            raise invalid(
                ["body", "schedule", "cycle_momentum"],
                f"optimizer {hp.name!r} has neither momentum nor betas to cycle; "
                "set cycle_momentum to false",
            )
    transforms = request.transforms or GradientTransforms()
    if request.nonfinite is not None:
        given = request.transforms is not None and "nonfinite" in transforms.model_fields_set
        if given and transforms.nonfinite != request.nonfinite:
            raise invalid(
                ["body", "nonfinite"],
                f"contradicts transforms.nonfinite ({transforms.nonfinite!r})",
            )
        transforms = transforms.model_copy(update={"nonfinite": request.nonfinite})
    try:
        layout = FlatLayout.from_shapes((n, a.shape) for n, a in tensors.items())
    except LayoutError as exc:
        raise layout_error(exc, ["body", "params"]) from None
    if layout.total > max_params:
        raise invalid(
            ["body", "params"],
            f"{layout.total} parameters in all, over this server's limit of {max_params}",
        )
    return Spec(
        hp=hp,
        optimizer=get_optimizer(hp.name),
        schedule=schedule,
        dtype=np.dtype(request.dtype),
        layout=layout,
        transforms=transforms,
    )


def parse_step(spec: Spec, body: bytes, binary: bool) -> StepInput:
    """A step body (JSON or binary) checked against `spec`, before any write."""
    arrays: dict[str, np.ndarray]
    if binary:
        raw, metadata = codecs.load_binary(body)
        arrays = {n: codecs.binary_tensor(a, ["body", "grads", n]) for n, a in raw.items()}
        loss = codecs.metadata_number(metadata, "loss", ["body", "loss"])
        ret = metadata.get("return", "params")
        if ret not in ("params", "updates", "none"):
            raise invalid(["body", "return"], f"must be params, updates or none: got {ret!r}")
        skip_missing = codecs.metadata_bool(metadata, "skip_missing", ["body", "skip_missing"])
    else:
        request = _validate(StepRequest, codecs.load_json(body))
        arrays = {n: codecs.json_tensor(v, ["body", "grads", n]) for n, v in request.grads.items()}
        loss, ret, skip_missing = request.loss, request.return_, request.skip_missing
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
    if not finite and spec.transforms.nonfinite != "skip":
        raise nonfinite_grads(*find_nonfinite(grads, spec.layout))
    if finite and loss is not None and not math.isfinite(loss):
        raise invalid(["body", "loss"], f"must be a finite number: got {loss}")
    return StepInput(grads, loss, ret, missing)


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any) -> M:
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
