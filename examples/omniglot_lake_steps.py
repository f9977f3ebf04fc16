"""Choose the adaptation steps of the Lake head protocol (examples/lake.py) on 20-way within-alphabet one-shot tasks
built from the meta-train characters, so that Lake et al.'s runs stay a test set.

    python examples/omniglot_lake_steps.py --data-root data/omniglot --run runs/maml-1shot

--run is the --out folder of a finished examples/omniglot.py run: its results.json gives the configuration and its
checkpoint the weights. Prints the error of the adapted head for each candidate number of steps, and of the cosine
nearest neighbour. Each task takes 20 characters of one alphabet and two of their drawings, by different drawers,
as the training and the test image, as Lake's runs do.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from episodic import int_list, make_learner  # noqa: E402
from lake import head_predictor, nearest_predictor, wide_head_learner  # noqa: E402

from paddlefsl.backbones import Conv4  # noqa: E402
from paddlefsl.datasets import Omniglot  # noqa: E402
from paddlefsl.training import load_checkpoint  # noqa: E402

WAYS = 20

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data-root", required=True, help="folder holding the Omniglot zips")
p.add_argument("--run", required=True, help="the --out folder of a finished examples/omniglot.py run")
p.add_argument("--steps", type=int_list, default=[3, 10, 20, 40],
               help="comma-separated candidate numbers of adaptation steps")
p.add_argument("--tasks", type=int, default=60, help="20-way tasks to score each candidate on")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
for name in ("results.json", "checkpoint.pkl"):
    if not os.path.exists(os.path.join(args.run, name)):
        p.error(f"--run {args.run!r} has no {name}: give the --out folder of a finished examples/omniglot.py run")
if args.tasks < 1 or not args.steps or min(args.steps) < 1:
    p.error(f"--tasks and every --steps value must be at least 1, got {args.tasks} and {args.steps}")
with open(os.path.join(args.run, "results.json")) as f:
    config = argparse.Namespace(**json.load(f)["config"])
if config.learn_inner_lr == "per_step_per_layer":
    p.error("--run learned per-step rates, which exist for its --inner-steps steps only: there is nothing to choose")

meta_learner = make_learner(config, Conv4.omniglot(config.ways))
load_checkpoint(os.path.join(args.run, "checkpoint.pkl"), meta_learner, restore_rng=False)
train = Omniglot(args.data_root, split=config.split, mode="train", rotations=False)
images, labels = np.asarray(train.images), np.asarray(train.labels)
alphabets = np.array([name.split("/")[0] for name in train.class_names])
wide_enough = [a for a in np.unique(alphabets) if (alphabets == a).sum() >= WAYS]

rng = np.random.default_rng(args.seed)
tasks = []
for _ in range(args.tasks):
    classes = rng.choice(np.flatnonzero(alphabets == rng.choice(wide_enough)), WAYS, replace=False)
    drawings = np.array([rng.choice(np.flatnonzero(labels == c), 2, replace=False) for c in classes])
    order = rng.permutation(WAYS)  # test image i shows class order[i]
    tasks.append((images[drawings[:, 0]], images[drawings[order, 1]], order))


def error(predict) -> float:
    return float(np.mean([np.mean(predict(support, query) != targets) for support, query, targets in tasks]))


wide = wide_head_learner(config, meta_learner)  # each prediction adapts a clone, so one serves every candidate
for steps in args.steps:
    head = head_predictor(wide, steps)
    print(f"head, {steps} steps: error {100 * error(head):.1f} %")
print(f"nearest neighbour: error {100 * error(nearest_predictor(meta_learner)):.1f} %")
