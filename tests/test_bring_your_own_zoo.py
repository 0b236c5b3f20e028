"""Bring your own zoo: a user's architecture and task, unknown to the registries, end to end through the CLI.

The test does what a user does: writes a module with an architecture (a gated MLP with LayerNorm)
and a synthetic task, trains a small population with its own loop into a nested layout
(``model_XXX/epoch_YY.safetensors`` + ``properties.csv`` keyed by ``path``), then runs
``zoo import --arch … --task …``, ``train``, ``probe`` and ``sample --evaluate``, and loads the
samples strictly into its own module. Then the bad cases.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from sane_hf.cli import main
from sane_hf.zoo.custom import resolve_entrypoint
from sane_hf.zoo.dataset import load_zoo, load_zoo_config

USER_CODE = textwrap.dedent(
    '''
    """My own architecture and data (not in sane-hf's registries)."""
    import torch
    from torch import nn


    class GatedMLP(nn.Module):
        def __init__(self, d_in=6, hidden=12, classes=3):
            super().__init__()
            self.inp = nn.Linear(d_in, hidden)
            self.gate = nn.Linear(d_in, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, classes)

        def forward(self, x):
            h = torch.tanh(self.inp(x)) * torch.sigmoid(self.gate(x))
            return self.out(self.norm(h))


    def build_net():
        return GatedMLP()


    def load_data():
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(3, 6, generator=g) * 1.5
        def draw(n):
            y = torch.randint(0, 3, (n,), generator=g)
            return centres[y] + torch.randn(n, 6, generator=g), y
        x_train, y_train = draw(300)
        x_test, y_test = draw(150)
        return x_train, y_train, x_test, y_test
    '''
)
NUM_MODELS, EPOCHS = 15, (0, 1, 2, 3)


def write_user_code(tmp_path):
    path = tmp_path / "my_zoo_code.py"
    path.write_text(USER_CODE)
    return path


def train_user_zoo(root, code_path):
    """The user's own loop: NUM_MODELS models, checkpoints at EPOCHS, a nested layout and properties.csv."""
    build = resolve_entrypoint(f"{code_path}:build_net")
    x_train, y_train, x_test, y_test = resolve_entrypoint(f"{code_path}:load_data")()
    rows = []
    for i in range(NUM_MODELS):
        torch.manual_seed(i)
        net, lr = build(), (0.003, 0.01, 0.03)[i % 3]
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        for epoch in range(max(EPOCHS) + 1):
            if epoch > 0:
                for start in range(0, len(y_train), 32):
                    loss = torch.nn.functional.cross_entropy(net(x_train[start:start + 32]), y_train[start:start + 32])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                train_acc = float((net(x_train).argmax(-1) == y_train).float().mean())
                test_acc = float((net(x_test).argmax(-1) == y_test).float().mean())
            rel = f"model_{i:03d}/epoch_{epoch:02d}.safetensors"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / rel)
            rows.append({"path": rel, "test_acc": test_acc, "train_acc": train_acc, "lr": lr, "seed": i,
                         "activation": ("tanh", "relu")[i % 2]})  # a column the user's module does not use
    with open(root / "properties.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def user_zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("byoz")
    code = write_user_code(tmp)
    src = tmp / "my_runs"
    train_user_zoo(src, code)
    return tmp, code, src


def test_bring_your_own_zoo_end_to_end(user_zoo, capsys):
    tmp, code, src = user_zoo
    zoo_dir, run, probe, samples = tmp / "zoo", tmp / "run", tmp / "probe", tmp / "samples"

    assert main(["zoo", "import", "--format", "folder", str(src), "--out", str(zoo_dir),
                 "--arch", f"{code}:build_net", "--task", f"{code}:load_data", "--split-fractions", "0.4", "0.2", "0.4",
                 "--no-progress"]) == 0
    config = load_zoo_config(zoo_dir)
    assert config.arch == "my_zoo_code:build_net" and config.task == "my_zoo_code:load_data"
    assert config.arch_entrypoint == f"{code.resolve()}:build_net"
    zoo = load_zoo(zoo_dir)
    rows = [r for s in zoo for r in zoo[s].select_columns(["model_id", "epoch", "test_acc"])]
    assert len(rows) == NUM_MODELS * len(EPOCHS)
    assert sorted({r["epoch"] for r in rows}) == list(EPOCHS)  # epoch read from the layout
    assert len({r["model_id"] for r in rows}) == NUM_MODELS  # one model per folder
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)

    assert main(["train", "--zoo", str(zoo_dir), "--out", str(run), "--token-size", "8", "--config", "small",
                 "--batch-size", "8", "--max-steps", "30", "--save-steps", "0", "--num-threads", "1",
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "permutation views are off" not in printed.err  # derived from the user's module graph
    assert "Generating" not in printed.err and "%|" not in printed.err  # --no-progress: no library bars either

    assert main(["probe", "--model", str(run), "--zoo", str(zoo_dir), "--out", str(probe), "--no-plots",
                 "--targets", "test_acc", "epoch", "--no-progress"]) == 0
    metrics = json.loads((probe / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["test_acc"]["sane"]) and math.isfinite(metrics["epoch"]["layer_stats"])

    assert main(["sample", "--model", str(run), "--zoo", str(zoo_dir), "--out", str(samples), "--evaluate",
                 "--num-samples", "4", "--num-prompts", "4", "--finetune-epochs", "0,1", "--max-neighbours", "6",
                 "--bn-samples", "64", "--candidates", "8", "--no-plots", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "random init" in printed.out and "diversity" in printed.out
    assert "Loading weights" not in printed.err and "Generating" not in printed.err  # --no-progress: no bars at all
    metrics = json.loads((samples / "metrics.json").read_text())
    assert metrics["arch"] == "my_zoo_code:build_net" and metrics["task"] == "my_zoo_code:load_data"
    assert metrics["activation"] == "any"  # the activation column does not filter prompts of the user's module
    assert len(metrics["prompts"]["model_ids"]) == 4
    assert metrics["transfer"]["fallback"]  # the user's task with permuted labels
    diversity = metrics["sampling"]["diversity"]
    assert sum(diversity["anchor_histogram"].values()) == 4 and diversity["anchors_used"] == 4
    user_module = resolve_entrypoint(f"{code}:GatedMLP")
    for path in sorted(samples.glob("sample_*.safetensors")):
        net = user_module()
        net.load_state_dict(load_file(str(path)), strict=True)
        assert torch.isfinite(net(torch.zeros(2, 6))).all()

    # without --evaluate: only the trained SANE and the prompts are needed
    plain = tmp / "plain"
    assert main(["sample", "--model", str(run), "--zoo", str(zoo_dir), "--out", str(plain), "--num-samples", "2",
                 "--no-progress"]) == 0
    metrics = json.loads((plain / "metrics.json").read_text())
    assert len(metrics["samples"]) == 2 and all(0.0 <= r["test_acc"] <= 1.0 for r in metrics["samples"])


def test_import_bad_cases_name_what_is_wrong(user_zoo, tmp_path):
    _, code, src = user_zoo
    # a checkpoint that does not fit --arch
    other = tmp_path / "other.py"
    other.write_text(USER_CODE + "\n\ndef wider():\n    return GatedMLP(hidden=16)\n")
    with pytest.raises(SystemExit, match=r"do not fit --arch 'other:wider'.*shapes gate.bias: \(12,\) vs \(16,\)"):
        main(["zoo", "import", "--format", "folder", str(src), "--out", str(tmp_path / "z1"),
              "--arch", f"{other}:wider", "--no-progress"])
    # an unimportable module:callable
    with pytest.raises(SystemExit, match=r"--arch 'no_such_module_xyz:build'.*cannot import 'no_such_module_xyz'"):
        main(["zoo", "import", "--format", "folder", str(src), "--out", str(tmp_path / "z2"),
              "--arch", "no_such_module_xyz:build", "--no-progress"])
    with pytest.raises(SystemExit, match=r"has no attribute 'nope'.*build_net"):
        main(["zoo", "import", "--format", "folder", str(src), "--out", str(tmp_path / "z3"),
              "--task", f"{code}:nope", "--no-progress"])
    # a properties row matching no file
    bad = tmp_path / "bad"
    (bad / "model_000").mkdir(parents=True)
    (bad / "model_000" / "epoch_00.safetensors").write_bytes((src / "model_000" / "epoch_00.safetensors").read_bytes())
    (bad / "properties.csv").write_text("path,test_acc\nmodel_000/epoch_00.safetensors,0.5\nmodel_007/epoch_09.pt,0.4\n")
    with pytest.raises(SystemExit, match=r"1 row\(s\) name no checkpoint file: \['model_007/epoch_09.pt'\]"):
        main(["zoo", "import", "--format", "folder", str(bad), "--out", str(tmp_path / "z4"), "--no-progress"])
    for name in ("z1", "z2", "z3", "z4"):
        assert not (tmp_path / name).exists(), name  # nothing written on failure


def test_a_recorded_entry_point_that_no_longer_imports(user_zoo, tmp_path):
    tmp, code, src = user_zoo
    moved = tmp_path / "moved_code.py"
    moved.write_text(code.read_text())
    zoo_dir = tmp_path / "zoo"
    assert main(["zoo", "import", "--format", "folder", str(src), "--out", str(zoo_dir),
                 "--arch", f"{moved}:build_net", "--task", f"{moved}:load_data", "--no-progress"]) == 0
    moved.unlink()
    with pytest.raises(SystemExit, match=r"sane-hf train: .*moved_code.py:build_net.*does not exist"):
        main(["train", "--zoo", str(zoo_dir), "--out", str(tmp_path / "run"), "--token-size", "8", "--config",
              "small", "--max-steps", "1", "--num-threads", "1", "--no-progress"])
