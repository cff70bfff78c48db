"""DDP on CPU (gloo, two processes): every rank measures, and corrects, the same way."""

import pytorch_lightning as pl
import torch

from lightning_sphere import SphereMonitor
from tests.lightning_helpers import Net


class AdamWNet(Net):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class SaveWeights(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        params = {name: p.detach() for name, p in pl_module.named_parameters()}  # buffers differ: BN sees its own data
        torch.save(params, self.folder / f"rank{trainer.global_rank}.pt")


def test_the_correction_is_applied_identically_on_every_rank(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[SphereMonitor(spherical_correction=True, log_every_n_steps=2), SaveWeights(tmp_path)],
    )  # fmt: skip
    trainer.fit(AdamWNet(batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    # The correction did run: the tracked rows moved on the sphere as AdamSRT moves them, not as AdamW.
    plain = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[SaveWeights(tmp_path / "plain")],
    )  # fmt: skip
    (tmp_path / "plain").mkdir()
    plain.fit(AdamWNet(batch_size=8))
    assert not torch.equal(torch.load(tmp_path / "plain" / "rank0.pt")["net.0.weight"], ranks[0]["net.0.weight"])
