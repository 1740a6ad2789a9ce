"""Run under torchrun by the distributed tests: a Trainer with the options in argv[1] (JSON)
that first evaluates, then trains; rank 0 prints the validation losses as JSON."""

import json
import sys

from tokenformer.train import Trainer, TrainConfig
from tokenformer.train.parallel import close_distributed

trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
first = trainer.evaluate()["val_loss"]
trainer.fit()
trainer.close()
if trainer.dist.is_main:
    print(json.dumps({"step": trainer.resumed_from and trainer.state.val_history[0]["step"], "first_val_loss": first}))
close_distributed()
