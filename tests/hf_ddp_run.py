"""Run by tests/test_hf.py under ``torchrun --nproc_per_node 2``: a Trainer on two CPU processes (gloo) with the
callback and a capture; each rank saves what it saw."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sphere.integrations.transformers import SphereCallback
from tests.test_hf import Capture, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    capture, sphere = Capture(), SphereCallback()
    trainer = train(folder, [capture, sphere], per_device_train_batch_size=4, ddp_backend="gloo")
    rank = trainer.args.process_index
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    logs = [log for log in capture.logs if "loss" in log]
    torch.save({"steps": capture.steps, "logs": logs, "weights": weights, "summary": sphere.summary()},
               folder / f"rank{rank}.pt")  # fmt: skip
