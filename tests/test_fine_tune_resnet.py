"""Fine-tuning a small BatchNorm ResNet on the CPU runs to the end (a oneDNN heap corruption killed it)."""

from __future__ import annotations

import torch
from helpers import run_python

SCRIPT = """
import json, math, torch
from sane_hf.zoo.architectures import create_model
from sane_hf.zoo.tasks import load_task
from sane_hf.zoo.train import fine_tune
torch.set_num_threads(1)
task = load_task("digits", image_size=8)
net = create_model("resnet18", image_size=8, width=4, seed=0)
before = torch.backends.mkldnn.enabled
accs = fine_tune(net, task, epochs=2, lr=1e-3, seed=0)
print(json.dumps({"accs": accs, "restored": torch.backends.mkldnn.enabled == before}))
"""


def test_resnet_fine_tune_survives_and_restores_the_backend(tmp_path):
    """In a fresh process (a heap corruption aborts the interpreter): two epochs, finite accuracies."""
    import json

    out = run_python(SCRIPT, cwd=tmp_path, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in result["accs"])
    assert result["accs"][1] > 0.2  # it learns: chance is 0.1
    assert result["restored"]


def test_native_cpu_kernels_is_scoped():
    from sane_hf.zoo.train import native_cpu_kernels

    before = torch.backends.mkldnn.enabled
    with native_cpu_kernels(torch.device("cpu")):
        assert torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled == before
    with native_cpu_kernels(torch.device("meta")):  # not the CPU: untouched
        assert torch.backends.mkldnn.enabled == before
