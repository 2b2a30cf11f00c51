"""Federated sessions' formulas: the `federated` config, the aggregators that combine a
round's client updates, and the server optimizers applied to the aggregate.

>>> config = parse_federated({"min_clients": 2, "aggregator": {"name": "mean"}})
>>> hp = parse_server_hyper({"name": "fedadam", "lr": 0.01})
>>> opt = get_server_optimizer(hp.name)
>>> state = opt.init(hp, params)
>>> delta = aggregate(config.aggregator, deltas, num_examples)
>>> params, state = opt.update(hp, -delta, state, params)   # g = -delta

See docs/federated.md for the HTTP contract; each module's docstring gives the rules, the
Flower code they mirror and where they differ.
"""

from service.core.federated.aggregators import (
    MAX_EXAMPLES,
    AggregationError,
    aggregate,
    krum_scores,
)
from service.core.federated.config import (
    Aggregator,
    FederatedConfig,
    FederatedError,
    KrumAggregator,
    MeanAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    UpdateKind,
    krum_min_clients,
    parse_federated,
)
from service.core.federated.server_optim import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdagradHyper,
    FedAdam,
    FedAdamHyper,
    FedAvg,
    FedAvgHyper,
    FedAvgM,
    FedAvgMHyper,
    FedOpt,
    FedOptHyper,
    FedYogi,
    FedYogiHyper,
    ServerHyper,
    get_server_optimizer,
    parse_server_hyper,
)

__all__ = [
    "MAX_EXAMPLES",
    "SERVER_OPTIMIZERS",
    "AggregationError",
    "Aggregator",
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
    "FederatedConfig",
    "FederatedError",
    "KrumAggregator",
    "MeanAggregator",
    "MedianAggregator",
    "ServerHyper",
    "TrimmedMeanAggregator",
    "UpdateKind",
    "aggregate",
    "get_server_optimizer",
    "krum_min_clients",
    "krum_scores",
    "parse_federated",
    "parse_server_hyper",
]
