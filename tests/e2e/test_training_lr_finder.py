"""An LR range test run over HTTP on a live server: the digits MLP (tests/support/digits.py)
trained by the server's SGD (momentum 0.9) on the lr_finder ramp, the client computing
each minibatch's loss and gradient in NumPy at the params the server answered.

The result the server reports (`GET .../lr-finder`) must be exactly what
`service.core.lr_finder` makes of the losses the client sent: same rates, same losses,
same smoothing, same stop reason, same suggestions. Around it: a step without a loss is
422, a step after the end is 409 `range-test-over` with nothing changed, and the three
plots are real 800 x 500 PNGs.
"""

from __future__ import annotations

import math

from service.core.lr_finder import METHODS, LRFinderConfig, LRFinderState, observe, ramp_lr, suggest
from tests.e2e.support import LiveServer, session_doc
from tests.e2e.training_support import (
    check_png,
    create_session,
    problem_of,
    push,
    step_answer,
)
from tests.support.digits import LAYOUT, init_params, load_data, loss_and_grad, minibatches

#: the core test's settings (tests/core/test_lr_range_digits.py): pytorch-lr-finder's
#: defaults with fastai's start_lr
CONFIG = LRFinderConfig(start_lr=1e-7, end_lr=10.0, num_steps=100, mode="exp")
OPTIMIZER = {"name": "sgd", "lr": 0.01, "momentum": 0.9}


def test_lr_range_test_over_http(memory_server: LiveServer) -> None:
    data = load_data()
    params = init_params(0)
    with memory_server.client() as c:
        doc = create_session(
            c,
            LAYOUT.unflatten(params),
            optimizer=OPTIMIZER,
            dtype="float64",
            lr_finder=CONFIG.model_dump(),
        )
        sid = doc["id"]
        assert doc["lr_finder"] == CONFIG.model_dump()
        assert doc["lr"] == CONFIG.start_lr  # the ramp's first rate, whatever optimizer.lr

        # every step of a range test needs its loss
        _, grads = loss_and_grad(params, data.x_train[:64], data.y_train[:64])
        r = push(c, sid, LAYOUT.unflatten(grads))
        body = problem_of(r, 422, "validation-error")
        assert any(e["loc"] == ["body", "loss"] for e in body["errors"]), body
        assert session_doc(c, sid)["version"] == 0

        sent: list[float] = []  # the loss of every step the server took
        batches = minibatches(len(data.y_train), seed=1)
        while True:
            idx = next(batches)
            loss, grads = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
            r = push(c, sid, LAYOUT.unflatten(grads), loss=loss, ret="params")
            if r.status_code == 409:
                break
            tensors, meta = step_answer(r)
            i = len(sent)
            assert float(meta["lr"]) == ramp_lr(CONFIG, i)  # step i runs at the ramp's lr_i
            assert int(meta["version"]) == i + 1
            sent.append(loss)
            if math.isfinite(loss):
                assert meta["skipped"] == "false"
                params = LAYOUT.flatten(tensors, "float64")
            assert len(sent) <= CONFIG.num_steps, "the server ran past num_steps"
        refused = problem_of(r, 409, "range-test-over")
        steps = len(sent)
        assert steps >= 1

        # the 409 changed nothing, and neither does a second one
        before = session_doc(c, sid)
        assert before["version"] == steps
        problem_of(push(c, sid, LAYOUT.unflatten(grads), loss=loss), 409, "range-test-over")
        after = session_doc(c, sid)
        assert (after["version"], after["step"], after["skipped"]) == (
            before["version"],
            before["step"],
            before["skipped"],
        )
        assert after["updated_at"] == before["updated_at"]

        # the server's result is service.core.lr_finder's on the same losses
        state = LRFinderState()
        for loss in sent:
            state = observe(CONFIG, state, loss)
        assert state.done, "the client stopped before the local range test did"
        want_suggestions = suggest(CONFIG, state)
        r = c.get(f"/v1/sessions/{sid}/lr-finder")
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["config"] == CONFIG.model_dump()
        assert result["lrs"] == list(state.lrs)
        assert result["lrs"] == [ramp_lr(CONFIG, i) for i in range(len(state.lrs))]
        assert result["losses"] == list(state.losses)
        assert result["smoothed"] == list(state.smoothed)
        assert result["best_loss"] == state.best_loss
        assert result["done"] is True
        assert result["stop_reason"] == state.stop_reason
        assert result["nonfinite_lr"] == state.nonfinite_lr
        assert result["next_lr"] is None
        assert set(result["suggestions"]) == set(METHODS)
        for method in METHODS:
            assert result["suggestions"][method] == want_suggestions[method].model_dump()
        assert state.stop_reason is not None
        assert state.stop_reason in refused["detail"], refused
        steepest = want_suggestions["steepest"].lr
        assert steepest is not None
        assert CONFIG.start_lr < steepest < CONFIG.end_lr

        # the plots: the range test, the session's schedule (its ramp), and a preview of
        # a schedule at the suggested rate
        finder_png = check_png(c.get(f"/v1/sessions/{sid}/lr-finder.png"))
        ramp_png = check_png(c.get(f"/v1/sessions/{sid}/schedule.png"))
        preview_png = check_png(
            c.post(
                "/v1/schedules/preview.png",
                json={
                    "lr": steepest,
                    "schedule": {"name": "step", "step_size": 70, "warmup": {"steps": 10}},
                    "steps": 210,
                    "current_step": 100,
                },
            )
        )

    found = ", ".join(
        f"{m} {s.lr:.4g}" if s.lr is not None else f"{m} none" for m, s in want_suggestions.items()
    )
    print(
        f"\nLR range test over HTTP: {steps} steps, {state.stop_reason} "
        f"(best smoothed loss {state.best_loss:.4f}, last loss {sent[-1]:.4g} "
        f"at lr {state.lrs[-1]:.4g}); suggestions: {found}"
        f"\nPNGs: lr-finder {finder_png} B, schedule {ramp_png} B, preview {preview_png} B"
    )
