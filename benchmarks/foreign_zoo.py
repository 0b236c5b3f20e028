"""A zoo from a task and architecture family sane-hf has no builder for, imported like a user's.

The user code (written next to the zoo as ``foreign_zoo_code.py``) is a 1-D convolutional network
with GELU, a LayerNorm and a linear head, on a synthetic signal task: which of four frequencies
(with random phase, amplitude and Gaussian noise) a length-48 signal carries. Neither the
architecture (``Conv1d``) nor the task exists in :mod:`sane_hf.zoo`'s registries. Each model gets
its own seed, learning rate (log-uniform 1e-3–1e-1), optimizer (SGD with momentum or Adam at a
tenth of the rate), weight decay and init gain, so accuracy varies from chance to near perfect;
checkpoints at epochs 0, 1, 2, 3, 5, 8 are written by the user's own loop in a nested layout
with a ``properties.csv``, then imported with
``sane-hf zoo import --format folder --arch code.py:build_net --task code.py:load_data``.

::

    python benchmarks/foreign_zoo.py --out /tmp/zoos/foreign              # 100 models (~2 min, one core)
    python benchmarks/foreign_zoo.py --out /tmp/zoos/foreign --models 20
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import textwrap
from pathlib import Path

USER_CODE = textwrap.dedent(
    '''
    """A 1-D CNN on a synthetic frequency task (written by benchmarks/foreign_zoo.py)."""
    import math

    import torch
    from torch import nn


    class SignalCNN(nn.Module):
        def __init__(self, channels=8, classes=4):
            super().__init__()
            self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
            self.conv2 = nn.Conv1d(channels, channels, 5, padding=2, stride=2)
            self.norm = nn.LayerNorm(channels)
            self.head = nn.Linear(channels, classes)

        def forward(self, x):
            h = nn.functional.gelu(self.conv1(x.unsqueeze(1)))
            h = nn.functional.gelu(self.conv2(h)).mean(-1)
            return self.head(self.norm(h))


    def build_net():
        return SignalCNN()


    def load_data():
        g = torch.Generator().manual_seed(0)
        t = torch.arange(48, dtype=torch.float32)
        freqs = torch.tensor([2.0, 3.0, 5.0, 7.0]) / 48

        def draw(n):
            y = torch.randint(0, 4, (n,), generator=g)
            phase = torch.rand(n, 1, generator=g) * 2 * math.pi
            amp = 0.5 + torch.rand(n, 1, generator=g)
            x = amp * torch.sin(2 * math.pi * freqs[y].unsqueeze(1) * t + phase)
            return x + 0.8 * torch.randn(n, 48, generator=g), y

        x_train, y_train = draw(1000)
        x_test, y_test = draw(500)
        return x_train, y_train, x_test, y_test
    '''
)
EPOCHS = (0, 1, 2, 3, 5, 8)


def _accuracy(net, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())


def train_models(src: Path, code: Path, num_models: int) -> None:
    """The user's own training loop: one folder per model, one safetensors file per checkpoint epoch."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from sane_hf.zoo.custom import resolve_entrypoint

    build = resolve_entrypoint(f"{code}:build_net")
    x_train, y_train, x_test, y_test = resolve_entrypoint(f"{code}:load_data")()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_models):
        torch.manual_seed(i)
        lr = float(10 ** rng.uniform(-3, -1))
        optimizer = ("sgd", "adam")[int(rng.integers(2))]
        weight_decay = float((0.0, 1e-4, 1e-3)[int(rng.integers(3))])
        gain = float(rng.choice([0.5, 1.0, 2.0]))
        net = build()
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:
                    p.mul_(gain)
        opt = (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay) if optimizer == "sgd"
               else torch.optim.Adam(net.parameters(), lr=lr / 10, weight_decay=weight_decay))
        for epoch in range(max(EPOCHS) + 1):
            if epoch > 0:
                order = torch.randperm(len(y_train))
                for start in range(0, len(order), 32):
                    idx = order[start:start + 32]
                    loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if epoch not in EPOCHS:
                continue
            state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
            if not all(bool(torch.isfinite(v).all()) for v in state.values()):
                break  # a diverged run: its later checkpoints are not part of the zoo
            rel = f"model_{i:03d}/epoch_{epoch:02d}.safetensors"
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, src / rel)
            rows.append({"path": rel, "train_acc": _accuracy(net, x_train, y_train),
                         "test_acc": _accuracy(net, x_test, y_test), "lr": lr, "optimizer": optimizer,
                         "weight_decay": weight_decay, "seed": i, "init": f"gain{gain:g}"})
    with open(src / "properties.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="zoo folder to write")
    parser.add_argument("--models", type=int, default=100)
    args = parser.parse_args(argv)
    import torch

    from sane_hf.cli import main as cli

    torch.set_num_threads(1)
    work = args.out.parent / (args.out.name + ".src")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    code = work / "foreign_zoo_code.py"
    code.write_text(USER_CODE)
    src = work / "runs"
    train_models(src, code, args.models)
    return cli(["zoo", "import", "--format", "folder", str(src), "--out", str(args.out), "--arch", f"{code}:build_net",
                "--task", f"{code}:load_data", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
