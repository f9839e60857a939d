"""PyTorch Lightning's DDPStrategy over a torch.distributed backend, 2 CPU processes.

    python tests/integration/lightning_ddp.py macfleet OUT.pt

Lightning starts the second process itself (it re-runs this command with LOCAL_RANK=1); rank 0
saves the final state_dict to OUT. `import macfleet` is the only MacFleet line.
"""

import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

import macfleet  # noqa: F401 - registers the "macfleet" backend


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


backend, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
model = Tiny()
g = torch.Generator().manual_seed(100)
data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend=backend),
                     max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
# Lightning's DistributedSampler splits the 32 samples between the two ranks.
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
if trainer.global_rank == 0:
    torch.save(model.state_dict(), out)
