"""Several workers train one model through one session, on the shared 2-worker server on
Redis (each request on a fresh connection, so that both uvicorn processes take them):
the digits MLP (tests/support/digits.py), gradients in NumPy in each worker thread.

* sync data parallel (`consistency: {"mode": "sync", "accumulate": 4}`): 4 workers push
  the gradients of the mean loss over their quarter of each minibatch, computed on the
  same version; the server averages them into one step. That is exactly one worker with
  the whole minibatch: the final params equal a local NumPy run of the same SGD to 1e-9.
* async with `max_staleness: 2`: 4 workers each read the params, compute a gradient on
  their own minibatches and push it with its `base_version`; pushes more than 2 versions
  behind are refused (409 stale-gradient) and retried on fresh params. The model still
  learns (held-out accuracy), no accepted push is staler than 2, and with
  `staleness_damping: inverse` every push ran at `lr / (1 + staleness)`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest

from service.core import get_optimizer, parse_hyper
from tests.e2e.support import LiveServer, decode, session_doc
from tests.e2e.training_support import (
    assert_all_busy,
    create_session,
    get_params,
    problem_of,
    push,
    rel_err,
    step_answer,
    worker_cpu,
)
from tests.support.digits import (
    BATCH,
    LAYOUT,
    Data,
    accuracy,
    init_params,
    load_data,
    loss_and_grad,
    minibatches,
)

WORKERS = 4
#: seconds any one test may take before its workers give up
BUDGET = 120.0


def _fresh(server: LiveServer) -> httpx.Client:
    """A client that opens a connection per request, so that either uvicorn worker
    process may answer any of them."""
    return server.client(headers={"Connection": "close"})


def _run_threads(target: Any) -> None:
    """`target(w)` in one thread per worker; the first exception of any is raised."""
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            target(w)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=BUDGET + 30)
    assert not any(th.is_alive() for th in threads), "a worker thread hangs"
    if errors:
        raise errors[0]


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return LAYOUT.flatten(tensors, np.float64)


# --- sync data parallel ------------------------------------------------------------------

SYNC_STEPS = 30
SYNC_OPTIMIZER = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
QUARTER = BATCH // WORKERS


def _reference(data: Data, params: np.ndarray, batches: list[np.ndarray]) -> list[np.ndarray]:
    """One worker with the whole minibatch, locally: the params after every step."""
    hyper = parse_hyper(SYNC_OPTIMIZER)
    opt = get_optimizer("sgd")
    state = opt.init(hyper, params, LAYOUT)
    out = []
    for idx in batches:
        _, grads = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
        params, state = opt.update(
            hyper, grads, state, params, lr=hyper.lr, layout=LAYOUT, impl="numpy"
        )
        out.append(params)
    return out


def test_sync_data_parallel_equals_one_worker(redis_server: LiveServer) -> None:
    data = load_data()
    initial = init_params(1)
    batches = list(itertools.islice(minibatches(len(data.y_train), seed=2), SYNC_STEPS))
    assert all(len(b) == WORKERS * QUARTER for b in batches)
    with redis_server.client() as c:
        doc = create_session(
            c,
            LAYOUT.unflatten(initial),
            optimizer=SYNC_OPTIMIZER,
            dtype="float64",
            consistency={"mode": "sync", "accumulate": WORKERS},
        )
    sid = doc["id"]
    assert doc["consistency"] == {
        "mode": "sync",
        "accumulate": WORKERS,
        "reduce": "mean",
        "timeout": 60.0,
        "on_timeout": "flush",
    }
    assert doc["pending"] == {
        "base_version": 0,
        "count": 0,
        "accumulate": WORKERS,
        "started_at": None,
        "deadline": None,
    }

    #: per worker, the params it got for every version 1..SYNC_STEPS
    seen: list[list[np.ndarray]] = [[] for _ in range(WORKERS)]
    #: per worker, the metadata of its answer at every step (None: it had to wait again)
    answers: list[list[dict[str, str] | None]] = [[] for _ in range(WORKERS)]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + BUDGET

    def work(w: int) -> None:
        params, version = initial, 0
        with _fresh(redis_server) as client:
            for s in range(SYNC_STEPS):
                idx = batches[s][w * QUARTER : (w + 1) * QUARTER]
                loss, grads = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
                while True:
                    assert time.monotonic() < deadline, "out of time"
                    r = push(
                        client,
                        sid,
                        LAYOUT.unflatten(grads),
                        loss=loss,
                        base_version=version,
                        wait=30,
                    )
                    if r.status_code != 409:
                        break
                    # a commit race the server gave up on: nothing was accumulated, push again
                    problem_of(r, 409, "version-conflict")
                    with lock:
                        outcomes["version-conflict"] += 1
                if r.status_code == 202:  # the step did not come within `wait`: wait again
                    pending = r.json()
                    assert pending["status"] == "pending", pending
                    assert (pending["version"], pending["wait_for"]) == (version, version + 1)
                    assert pending["accumulate"] == WORKERS
                    assert r.headers["location"].endswith(f"min_version={version + 1}")
                    tensors, got = get_params(client, sid, min_version=version + 1)
                    kind, meta = "202", None
                else:
                    tensors, meta = step_answer(r)
                    got = int(meta["version"])
                    assert int(meta["step"]) == s + 1, meta
                    assert meta["contributors"] == str(WORKERS), meta
                    assert meta["staleness"] == "0", meta
                    assert float(meta["lr"]) == SYNC_OPTIMIZER["lr"], meta
                    assert meta["skipped"] == "false", meta
                    kind = "200"
                assert got == version + 1, (got, version)
                params, version = _flat(tensors), got
                seen[w].append(params)
                answers[w].append(meta)
                with lock:
                    outcomes[kind] += 1

    cpu = worker_cpu(redis_server)
    _run_threads(work)
    assert_all_busy(redis_server, cpu)

    # every worker saw the same params at every version
    for s in range(SYNC_STEPS):
        for w in range(1, WORKERS):
            assert np.array_equal(seen[w][s], seen[0][s]), f"workers 0 and {w} differ at {s + 1}"
    want = _reference(data, initial, batches)
    errors = [rel_err(seen[0][s], want[s]) for s in range(SYNC_STEPS)]
    assert max(errors) <= 1e-9, f"max relative error {max(errors):.3g}"
    assert outcomes["200"] + outcomes["202"] == WORKERS * SYNC_STEPS, outcomes

    with redis_server.client() as c:
        final, version = get_params(c, sid)
        assert version == SYNC_STEPS
        assert rel_err(_flat(final), want[-1]) <= 1e-9
        doc = session_doc(c, sid)
        assert (doc["step"], doc["version"], doc["skipped"]) == (SYNC_STEPS, SYNC_STEPS, 0)
        assert doc["pending"] == {
            "base_version": SYNC_STEPS,
            "count": 0,
            "accumulate": WORKERS,
            "started_at": None,
            "deadline": None,
        }

        # each step: K contributors, the loss the mean of theirs (= the whole batch's)
        r = c.get(f"/v1/sessions/{sid}/history", params={"limit": 1000})
        assert r.status_code == 200, r.text
        history = r.json()["entries"][::-1]
        assert [e["step"] for e in history] == list(range(1, SYNC_STEPS + 1))
        params = initial
        for s, (entry, idx, after) in enumerate(zip(history, batches, want, strict=True)):
            assert entry["kind"] == "step"
            assert (entry["contributors"], entry["staleness"]) == (WORKERS, 0)
            # the completing push and the waiting ones answer the same step: its rate and
            # the norm of the combined gradient
            metas = [m for a in answers if (m := a[s]) is not None]
            assert all(m == metas[0] for m in metas), metas
            assert float(metas[0]["grad_norm"]) == entry["grad_norm"], (metas[0], entry)
            batch_loss, _ = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
            assert entry["loss"] == pytest.approx(batch_loss, rel=1e-9)
            params = after

        # a late push (computed on an old version) is refused, nothing accumulated
        _, grads = loss_and_grad(seen[0][-2], data.x_train[:QUARTER], data.y_train[:QUARTER])
        r = push(c, sid, LAYOUT.unflatten(grads), base_version=SYNC_STEPS - 1)
        body = problem_of(r, 409, "stale-gradient")
        assert (body["version"], body["base_version"]) == (SYNC_STEPS, SYNC_STEPS - 1), body
        doc = session_doc(c, sid)
        assert doc["version"] == SYNC_STEPS
        assert doc["pending"]["count"] == 0
        final_after, _ = get_params(c, sid)
        assert np.array_equal(_flat(final_after), _flat(final))

    loss0 = loss_and_grad(initial, data.x_train, data.y_train)[0]
    loss1 = loss_and_grad(want[-1], data.x_train, data.y_train)[0]
    print(
        f"\nsync data parallel: {WORKERS} workers x {QUARTER} samples, {SYNC_STEPS} steps; "
        f"answers {outcomes['200']} x 200, {outcomes['202']} x 202, "
        f"{outcomes['version-conflict']} version conflicts retried"
        f"\nmax relative difference to one worker with the whole batch: {max(errors):.3g} "
        f"(final {errors[-1]:.3g}); train loss {loss0:.3f} -> {loss1:.3f}, "
        f"test accuracy {accuracy(want[-1], data.x_test, data.y_test):.4f}"
    )


# --- async with bounded staleness --------------------------------------------------------

ASYNC_STEPS = 300
ASYNC_LR = 0.05
MAX_STALENESS = 2
MIN_ACCURACY = 0.90


@pytest.mark.parametrize("damping", ["none", "inverse"])
def test_async_workers_with_bounded_staleness(redis_server: LiveServer, damping: str) -> None:
    data = load_data()
    initial = init_params(3)
    consistency = {"mode": "async", "max_staleness": MAX_STALENESS, "staleness_damping": damping}
    with redis_server.client() as c:
        doc = create_session(
            c,
            LAYOUT.unflatten(initial),
            optimizer={"name": "sgd", "lr": ASYNC_LR, "momentum": 0.9},
            dtype="float32",
            consistency=consistency,
        )
    sid = doc["id"]
    assert doc["consistency"] == consistency

    accepted: list[dict[str, str]] = []  # the metadata of every 200
    refused: list[dict[str, Any]] = []  # the body of every 409 stale-gradient
    conflicts = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + BUDGET

    def work(w: int) -> None:
        batches = minibatches(len(data.y_train), seed=100 + w)
        with _fresh(redis_server) as client:
            while True:
                assert time.monotonic() < deadline, "out of time"
                with lock:
                    if len(accepted) >= ASYNC_STEPS:
                        return
                tensors, version = get_params(client, sid)
                idx = next(batches)
                loss, grads = loss_and_grad(_flat(tensors), data.x_train[idx], data.y_train[idx])
                r = push(
                    client,
                    sid,
                    LAYOUT.unflatten(grads),
                    loss=loss,
                    base_version=version,
                    ret="none",
                )
                if r.status_code == 200:
                    _, meta = step_answer(r)
                    with lock:
                        accepted.append(meta)
                    continue
                body = r.json()
                with lock:
                    if body.get("type", "").endswith("version-conflict"):
                        conflicts[0] += 1
                    else:
                        refused.append(problem_of(r, 409, "stale-gradient"))

    cpu = worker_cpu(redis_server)
    _run_threads(work)
    assert_all_busy(redis_server, cpu)

    steps = len(accepted)
    assert ASYNC_STEPS <= steps < ASYNC_STEPS + WORKERS
    # each accepted push made exactly one version, and none was staler than allowed
    assert sorted(int(m["version"]) for m in accepted) == list(range(1, steps + 1))
    stalenesses = [int(m["staleness"]) for m in accepted]
    assert all(0 <= s <= MAX_STALENESS for s in stalenesses), Counter(stalenesses)
    assert max(stalenesses) >= 1, "the workers never overlapped: no concurrency was tested"
    for m in accepted:
        want_lr = ASYNC_LR / (1 + int(m["staleness"])) if damping == "inverse" else ASYNC_LR
        assert float(m["lr"]) == pytest.approx(want_lr, rel=1e-15), m
        assert m["contributors"] == "1", m
    for body in refused:
        assert body["version"] - body["base_version"] > MAX_STALENESS, body

    with redis_server.client() as c:
        doc = session_doc(c, sid)
        assert (doc["step"], doc["version"], doc["skipped"]) == (steps, steps, 0)
        r = c.get(f"/v1/sessions/{sid}/params", headers={"Accept": "application/octet-stream"})
        assert r.status_code == 200, r.text
        final, _ = decode(r.content)
    params = _flat(final)
    test_accuracy = accuracy(params, data.x_test, data.y_test)
    train_loss = loss_and_grad(params, data.x_train, data.y_train)[0]
    initial_loss = loss_and_grad(initial, data.x_train, data.y_train)[0]
    print(
        f"\nasync, max_staleness {MAX_STALENESS}, damping {damping}: {WORKERS} workers, "
        f"{steps} accepted steps, {len(refused)} stale refusals, {conflicts[0]} version "
        f"conflicts; staleness of accepted steps {dict(sorted(Counter(stalenesses).items()))}"
        f"\ntrain loss {initial_loss:.3f} -> {train_loss:.4f}; held-out accuracy "
        f"{test_accuracy:.4f}"
    )
    assert train_loss < initial_loss / 5
    assert test_accuracy >= MIN_ACCURACY
