"""Run under torchrun by the distributed tests: a Trainer with the options in argv[1] (JSON);
it evaluates, trains up to step ``grow_at``, grows by ``tokens`` (argv[2], JSON), evaluates
again and trains to the end. Rank 0 prints the three validation losses as JSON."""

import json
import sys

from tokenformer.train import TrainConfig, Trainer
from tokenformer.train.parallel import close_distributed

trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
growth = json.loads(sys.argv[2])
first = trainer.evaluate()["val_loss"]
trainer.fit(growth["grow_at"])
before = trainer.evaluate()["val_loss"]
trainer.grow(**growth["tokens"])
after = trainer.evaluate()["val_loss"]
moments_fit = all(
    trainer.optimizer.state[p]["exp_avg"].shape == p.shape for g in trainer.optimizer.param_groups for p in g["params"]
)
trainer.fit()
trainer.close()
if trainer.dist.is_main:
    print(json.dumps({"first": first, "before": before, "after": after, "moments_fit": moments_fit}))
close_distributed()
