"""Server optimizers: what a federated session does with a round's aggregate.

Each is an `Optimizer` of the core (service/core/optim/base.py), so a session keeps its
state as any other (`init(hp, params, layout)`, `update(hp, grads, state, params, lr,
layout, inplace=..., impl=...)`, `OptState.to_bytes`), with one convention: the `grads`
they are given is the PSEUDO-GRADIENT `g = -delta`, where `delta` is the round's aggregate
(`aggregate(...)`: the clients' new weights minus the global weights, combined). The state
counts rounds in its scalar `step` (1-based after the update: the round `r` below). None
has a fused kernel: `impl="auto"` runs the NumPy code.

* `fedavg` (lr 1.0): the core `sgd`, `x <- x - lr * g`; with `lr = 1` the new global model
  is the aggregate itself (McMahan et al. 2017; Flower's FedAvg).
* `fedavgm` (lr 1.0, momentum 0.9): the core `sgd` with momentum (torch's buffer),
  `v_1 = g`, `v <- momentum * v + g`, `x <- x - lr * v` (Hsu et al. 2019; Flower's FedAvgM).
* `fedadagrad`, `fedadam`, `fedyogi` (lr 0.01, betas (0.9, 0.99), tau 1e-3,
  bias_correction False, initial_accumulator None = tau^2): Reddi et al. 2021,
  Algorithm 2, see `FedOpt`.

References: S. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konecny, S. Kumar,
H. B. McMahan, "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2); T.-M. H. Hsu,
H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019 (FedAvgM); Flower 1.41.0, `flwr/server/strategy/fedavgm.py`,
`fedopt.py`, `fedadagrad.py`, `fedadam.py`, `fedyogi.py` (the differences are listed on
each class).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from service.core.errors import HyperparameterError
from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.sgd import SGD, SGDHyper
from service.core.state import OptState
from service.core.validators import Beta, BetaPair, NonNeg, Positive

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdagrad",
    "FedAdagradHyper",
    "FedAdam",
    "FedAdamHyper",
    "FedAvg",
    "FedAvgHyper",
    "FedAvgM",
    "FedAvgMHyper",
    "FedOpt",
    "FedOptHyper",
    "FedYogi",
    "FedYogiHyper",
    "ServerHyper",
    "get_server_optimizer",
    "parse_server_hyper",
]

_SGD = SGD()


class FedAvgHyper(Hyper):
    """Hyperparameters of `fedavg`: the server rate `lr` (1.0: the aggregate is the model)."""

    name: Literal["fedavg"] = "fedavg"
    lr: NonNeg = 1.0


class FedAvgMHyper(Hyper):
    """Hyperparameters of `fedavgm`: `lr` (1.0) and `momentum` (0.9) in [0, 1)."""

    name: Literal["fedavgm"] = "fedavgm"
    lr: NonNeg = 1.0
    momentum: Beta = 0.9


class FedAvg(Optimizer[FedAvgHyper]):
    r"""FedAvg's server step: plain SGD on the pseudo-gradient ``g = -delta``::

        x = x - lr * g          (= x + lr * delta)

    Default lr 1.0, which makes the new model the aggregate itself (McMahan et al. 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data"; the
    "FedAvg" of Reddi et al. 2021 with server rate 1). Runs the core ``sgd``
    (``SGD.step_numpy``, momentum 0), so it is exactly ``torch.optim.SGD``'s step.
    State: ``step`` only.

    Flower's FedAvg returns the weighted mean of the weights itself; this adds the mean
    of the deltas to ``x``: equal to rounding.

    Tested (tests/core/test_federated_server_optim.py) against ``x - lr * g`` written in
    the test, float64, relative error <= 1e-12 over 30 rounds.
    """

    name = "fedavg"
    hyper = FedAvgHyper
    reference: ClassVar[str] = "McMahan et al. 2017 (FedAvg); torch.optim.SGD via core sgd"

    def state_arrays(self, hp: FedAvgHyper) -> tuple[str, ...]:
        return ()

    def step_numpy(
        self,
        hp: FedAvgHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        _SGD.step_numpy(SGDHyper(lr=hp.lr), grads, state, params, lr, layout)


class FedAvgM(Optimizer[FedAvgMHyper]):
    r"""FedAvgM's server step: SGD with momentum on the pseudo-gradient ``g = -delta``::

        v = g                       in the first round
        v = momentum * v + g        afterwards
        x = x - lr * v

    Defaults: lr 1.0, momentum 0.9 (in [0, 1); 0 is ``fedavg``). Runs the core ``sgd``
    with ``momentum`` (dampening 0, no Nesterov), whose buffer is torch's: state
    ``momentum_buffer`` (made in the first round) and ``step``.

    Reference: Hsu, Qi & Brown 2019. Flower's FedAvgM (fedavgm.py:160-188 in flwr 1.41.0)
    computes ``pseudo_gradient = x - fedavg_result`` (our ``g``), sets
    ``momentum_vector = pseudo_gradient`` when ``server_round == 1`` and
    ``server_momentum * v + pseudo_gradient`` afterwards, then ``x - server_learning_rate
    * v``: the same recursion, in the same operation order. Differences: Flower starts the
    buffer by the round number (``server_round > 1``), we by the buffer's absence (the
    same for rounds counted from 1); Flower's defaults are ``server_learning_rate=1.0``,
    ``server_momentum=0.0`` (and with both at those values it skips the server step and
    returns the weighted mean of the weights); our momentum default is 0.9 (Hsu et al.'s
    usual value).

    Tested against the momentum recursion written in the test (float64, 1e-12, 30 rounds)
    and against Flower's FedAvgM in benchmarks/federated_flower.py.
    """

    name = "fedavgm"
    hyper = FedAvgMHyper
    reference: ClassVar[str] = "Hsu et al. 2019 (FedAvgM); Flower FedAvgM; core sgd"
    lazy_arrays = ("momentum_buffer",)

    def state_arrays(self, hp: FedAvgMHyper) -> tuple[str, ...]:
        return ()

    def step_numpy(
        self,
        hp: FedAvgMHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        sgd_hp = SGDHyper(lr=hp.lr, momentum=hp.momentum)
        _SGD.step_numpy(sgd_hp, grads, state, params, lr, layout)


class FedOptHyper(Hyper):
    """Hyperparameters shared by `fedadagrad`, `fedadam`, `fedyogi`.

    * `lr` (0.01) >= 0: the server rate (the paper's eta);
    * `betas` (0.9, 0.99), each in [0, 1): `b1` for the first moment (all three), `b2` for
      the second (Adam and Yogi; Adagrad's `v` is a sum and ignores it, but for
      `bias_correction`);
    * `tau` (1e-3) > 0: the adaptivity (added to `sqrt(v)`);
    * `bias_correction` (False): scale the rate by `sqrt(1 - b2^r) / (1 - b1^r)` in round
      `r` (1-based);
    * `initial_accumulator` (None: `tau**2`) >= 0: the starting `v` (the paper asks
      `v_{-1} >= tau^2`; Flower starts at 0).
    """

    lr: NonNeg = 1e-2
    betas: BetaPair = (0.9, 0.99)
    tau: Positive = 1e-3
    bias_correction: bool = False
    initial_accumulator: NonNeg | None = None


class FedAdagradHyper(FedOptHyper):
    """Hyperparameters of `fedadagrad` (see FedOptHyper)."""

    name: Literal["fedadagrad"] = "fedadagrad"


class FedAdamHyper(FedOptHyper):
    """Hyperparameters of `fedadam` (see FedOptHyper)."""

    name: Literal["fedadam"] = "fedadam"


class FedYogiHyper(FedOptHyper):
    """Hyperparameters of `fedyogi` (see FedOptHyper)."""

    name: Literal["fedyogi"] = "fedyogi"


class FedOpt(Optimizer[FedOptHyper]):
    r"""Reddi et al. 2021, Algorithm 2 (FedOpt), on ``delta = -g`` (the aggregate), round
    ``r`` (1-based; the state's ``step`` after the update)::

        m = b1 * m + (1 - b1) * delta
        v = v + delta^2                                   FedAdagrad
        v = b2 * v + (1 - b2) * delta^2                   FedAdam
        v = v - (1 - b2) * delta^2 * sign(v - delta^2)    FedYogi
        lr_r = lr                                         (bias_correction False)
        lr_r = lr * sqrt(1 - b2^r) / (1 - b1^r)           (bias_correction True)
        x = x + lr_r * m / (sqrt(v) + tau)

    with ``m`` starting at 0 and ``v`` at ``initial_accumulator`` (None: ``tau**2``, the
    paper's ``v_{-1} >= tau^2``). State: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``step``.
    Defaults: lr 0.01, betas (0.9, 0.99), tau 1e-3, bias_correction False,
    initial_accumulator None; the paper's grid has tau in {1e-1 ... 1e-5}, b1 0.9, b2 0.99
    (its companion code, Keras' defaults, 0.999).

    The operations are done in Flower's order (``b1 * m + (1 - b1) * delta``,
    ``(1 - b2) * (delta * delta)``, ``x + (lr_r * m) / (sqrt(v) + tau)``), in the params'
    dtype.

    Flower 1.41.0 (flwr/server/strategy/), where it differs:

    * ``v`` starts at 0 in all three (fedadagrad.py:163, fedadam.py:169, fedyogi.py:169:
      ``np.zeros_like``), where the paper asks ``v_{-1} >= tau^2``. With
      ``initial_accumulator=0`` we do the same.
    * FedAdagrad passes ``beta_1=0.0, beta_2=0.0`` to FedOpt (fedadagrad.py:122-123, its
      constructor takes no betas), so its ``m`` is ``delta`` itself: no momentum. The
      paper's FedAdagrad keeps ``m`` with ``b1``, as we do; ``betas=(0, b2)`` gives
      Flower's.
    * FedAdam alone bias-corrects (fedadam.py:179-183), with the exponent
      ``server_round + 1.0``, where Flower's ``server_round`` starts at 1
      (flwr/server/server.py:110): its round ``r`` runs at
      ``eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1))`` (0.742 eta in the first round at
      betas (0.9, 0.99), where Kingma & Ba's correction gives 1.0 eta). Our
      ``bias_correction=True`` uses ``r`` (Kingma & Ba's ``t``). Flower's exact rate is
      ours with ``bias_correction=False`` and that rate passed as ``lr`` in round ``r``
      (what benchmarks/federated_flower.py does). The paper has no bias correction, hence
      our default False.
    * FedYogi: the same rule as ours, with ``v`` from 0.
    * Flower's defaults: FedAdagrad eta 0.1, tau 1e-9; FedAdam eta 0.1, betas (0.9, 0.99),
      tau 1e-9; FedYogi eta 0.01, betas (0.9, 0.99), tau 1e-3 (fedadagrad.py:103-105,
      fedadam.py:107-111, fedyogi.py:107-111). Our defaults are FedYogi's for all three
      (docs/federated.md): with ``v`` from 0 and tau 1e-9, the first step is
      ``lr * (1 - b1) / sqrt(1 - b2) * sign(delta)`` (FedAdam; FedAdagrad's is
      ``lr * sign(delta)``) on nearly every coordinate, however small ``delta``.

    Tested (tests/core/test_federated_server_optim.py) against the equations above
    written per element in the test (float64, relative error <= 1e-12, 30 rounds of
    seeded random deltas, every option, state saved and restored mid-run), and against
    Flower's strategies in benchmarks/federated_flower.py.
    """

    name: ClassVar[str] = "fedopt"
    hyper: type[FedOptHyper] = FedOptHyper
    reference: ClassVar[str] = "Reddi et al. 2021, Adaptive Federated Optimization, Alg. 2"

    def state_arrays(self, hp: FedOptHyper) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def initial_array(self, hp: FedOptHyper, name: str, params: np.ndarray) -> np.ndarray:
        if name == "exp_avg_sq":
            start = hp.tau**2 if hp.initial_accumulator is None else hp.initial_accumulator
            return np.full_like(params, start)
        return super().initial_array(hp, name, params)

    @abstractmethod
    def second_moment_(self, hp: FedOptHyper, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update `v` in place from `delta_sq = delta * delta`."""

    def step_numpy(
        self,
        hp: FedOptHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        rnd = state.advance()
        delta = -grads
        m, v = state.arrays["exp_avg"], state.arrays["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * delta
        self.second_moment_(hp, v, delta * delta)
        rate = lr
        if hp.bias_correction:
            rate = lr * (1.0 - beta2**rnd) ** 0.5 / (1.0 - beta1**rnd)
        denom = np.sqrt(v)
        denom += hp.tau
        params += (rate * m) / denom


class FedAdagrad(FedOpt):
    r"""FedAdagrad (Reddi et al. 2021, Algorithm 2): ``v = v + delta^2``; the rest as
    :class:`FedOpt` (first moment with ``b1``; ``b2`` is used only by
    ``bias_correction``, whose ``sqrt(1 - b2^r)`` factor has no meaning for a sum, kept so
    that the three share one option). Flower's FedAdagrad has no first moment
    (``beta_1 = 0``) and ``v`` from 0: ``betas=(0, b2), initial_accumulator=0``.
    """

    name = "fedadagrad"
    hyper = FedAdagradHyper
    reference: ClassVar[str] = "Reddi et al. 2021, Alg. 2 (FedAdagrad); Flower FedAdagrad"

    def second_moment_(self, hp: FedOptHyper, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq


class FedAdam(FedOpt):
    r"""FedAdam (Reddi et al. 2021, Algorithm 2): ``v = b2 * v + (1 - b2) * delta^2``;
    the rest as :class:`FedOpt`. Flower's FedAdam: ``initial_accumulator=0`` and its
    bias correction one round ahead (see FedOpt).
    """

    name = "fedadam"
    hyper = FedAdamHyper
    reference: ClassVar[str] = "Reddi et al. 2021, Alg. 2 (FedAdam); Flower FedAdam"

    def second_moment_(self, hp: FedOptHyper, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v *= hp.betas[1]
        v += (1.0 - hp.betas[1]) * delta_sq


class FedYogi(FedOpt):
    r"""FedYogi (Reddi et al. 2021, Algorithm 2):
    ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``; the rest as :class:`FedOpt`.
    Flower's FedYogi: ``initial_accumulator=0``.
    """

    name = "fedyogi"
    hyper = FedYogiHyper
    reference: ClassVar[str] = "Reddi et al. 2021, Alg. 2 (FedYogi); Flower FedYogi"

    def second_moment_(self, hp: FedOptHyper, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v -= ((1.0 - hp.betas[1]) * delta_sq) * np.sign(v - delta_sq)


ServerHyper = Annotated[
    FedAvgHyper | FedAvgMHyper | FedAdagradHyper | FedAdamHyper | FedYogiHyper,
    Field(discriminator="name"),
]

SERVER_OPTIMIZERS: dict[str, Optimizer[Any]] = {
    opt.name: opt for opt in (FedAvg(), FedAvgM(), FedAdagrad(), FedAdam(), FedYogi())
}

_ADAPTER: TypeAdapter[Hyper] = TypeAdapter(ServerHyper)


def get_server_optimizer(name: str) -> Optimizer[Any]:
    """The server optimizer registered as `name`; HyperparameterError (loc `name`)
    listing the known ones otherwise."""
    try:
        return SERVER_OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(sorted(SERVER_OPTIMIZERS))
        raise HyperparameterError(
            [{"loc": ("name",), "msg": f"unknown server optimizer {name!r}; known: {known}"}]
        ) from None


def parse_server_hyper(data: Mapping[str, Any]) -> Hyper:
    """Validate a server optimizer spec (`{"name": "fedadam", ...}`), defaults filled.

    Raises HyperparameterError naming each field at fault, e.g.
    `tau must be > 0: got 0.0`, or `name` for a name that is not a server optimizer.
    """
    name = data.get("name") if isinstance(data, Mapping) else None
    if not isinstance(name, str):
        raise HyperparameterError([{"loc": ("name",), "msg": "server optimizer name is required"}])
    get_server_optimizer(name)
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise HyperparameterError(
            [{"loc": _strip_tag(tuple(e["loc"]), name), "msg": e["msg"]} for e in exc.errors()]
        ) from None


def _strip_tag(loc: tuple[int | str, ...], name: str) -> tuple[int | str, ...]:
    # a discriminated union reports ('fedadam', 'tau'); the field is ('tau',)
    return loc[1:] if loc and loc[0] == name else loc
