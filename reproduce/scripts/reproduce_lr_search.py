"""The learning-rate search behind the defaults of ``torch-adamp reproduce`` (see docs/reproduction.md).

For every task but classification (whose settings are ``compare``'s), each learning rate of LRS is
tried with the baseline AdamW and with AdamP on one seed (100) that the reported runs (seeds 0, 1, ...)
never use; the learning rate with the better *mean of the two optimizers'* headline metric becomes
the family's default for both, so that neither is tuned alone. Weight decay stays 0.1 (decoupled).

    python reproduce/scripts/reproduce_lr_search.py OUT.json [--lrs 1e-3,3e-3,1e-2] [TASK ...]
"""

from __future__ import annotations

import argparse
import json

import torch

from torch_adamp_reproduce import tasks as reproduce
from torch_adamp_reproduce.tasks import common

LRS = (1e-3, 3e-3, 1e-2)
SEED = 100
TASKS = {
    "retrieval": (reproduce.retrieval, {}),
    "detection": (reproduce.detection, {}),
    "adversarial": (reproduce.adversarial, {}),
    "bias": (reproduce.bias, {}),
    "language": (reproduce.language, {"weight_norm": True}),
    "language-plain": (reproduce.language, {"weight_norm": False}),
    "audio": (reproduce.audio, {}),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    names = args.tasks
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        module, fixed = TASKS[name]
        out[name] = {}
        for lr in (float(t) for t in args.lrs.split(",")):
            exp = module.experiment(module.Config(**fixed, lr=lr))
            res = common.run(exp, [SEED], quiet=True, log=lambda s: None)
            key = exp.metrics[0].key
            row = {o: res["summary"]["optimizers"][o][key][0] for o in exp.optimizers}
            out[name][f"{lr:g}"] = row
            print(name, lr, key, row, f"{res['seconds']:.0f} s", flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
