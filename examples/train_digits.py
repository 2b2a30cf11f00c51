"""Train a small MLP on scikit-learn's digits with the optimizer running on optserve.

The model, the data and the backward pass stay here, in PyTorch; `RemoteOptimizer`
sends each step's gradients to the server, which applies AdamW with a one-cycle
schedule and answers the new weights. Start a server first, then:

    optserve serve &                                   # or docker compose up
    OPTSERVE_URL=http://127.0.0.1:8000 python examples/train_digits.py

(`OPTSERVE_URL` defaults to http://127.0.0.1:8000; `OPTSERVE_API_KEY` is sent when
set.) Needs torch and scikit-learn; the digits are bundled with scikit-learn, nothing
is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from clients.torch import RemoteOptimizer

EPOCHS = 8
BATCH = 64


def main() -> None:
    # data: 1,797 8x8 images of digits, 75% to train, 25% to test, standardized
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    x_train_t = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    x_test_t = torch.tensor((x_test - mean) / std, dtype=torch.float32)
    y_train_t, y_test_t = torch.tensor(y_train), torch.tensor(y_test)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    steps_per_epoch = len(x_train_t) // BATCH
    opt = RemoteOptimizer(
        model.named_parameters(),
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        {"name": "one_cycle", "max_lr": 0.01, "total_steps": EPOCHS * steps_per_epoch},
    )
    print(f"session {opt.session_id}: adamw + one_cycle, {EPOCHS} epochs")

    rng = np.random.default_rng(0)
    accuracy = 0.0
    for epoch in range(1, EPOCHS + 1):
        order = torch.from_numpy(rng.permutation(len(x_train_t)))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train_t[idx]), y_train_t[idx])
            loss.backward()
            opt.step(loss=loss.item())  # the server updates the weights in `model`
            losses.append(loss.item())
        with torch.no_grad():
            accuracy = (model(x_test_t).argmax(dim=1) == y_test_t).float().mean().item()
        lr = opt.param_groups[0]["lr"]  # the rate the server used for the last step
        print(
            f"epoch {epoch}: loss {np.mean(losses):.4f}, lr {lr:.2e}, test accuracy {accuracy:.4f}"
        )

    print(f"final test accuracy: {accuracy:.4f}")
    opt.delete_session()  # the job is done: free the server's state
    opt.close()


if __name__ == "__main__":
    main()
