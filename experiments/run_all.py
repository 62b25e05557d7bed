"""Run every scifm training of the experiments, one after another (the long part, ~2 h on a
2-core CPU); each experiment's run.py then finds them done and only adds baselines and plots.

    python experiments/run_all.py [name ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, run_scifm

EXP = REPO / "experiments"
FREESOLV_TEXT = ["--model.model.head.kind=none", "--data.init_args.template=freesolv_name"]
RUNS = {
    "freesolv_scifm": (EXP / "freesolv/config.yaml", []),
    "freesolv_scifm_random_init": (EXP / "freesolv/config.yaml", ["--model.model.backbone.pretrained=false"]),
    "solubility_scifm": (EXP / "solubility/config.yaml", []),
    "pbmc_scifm": (EXP / "pbmc_cell_types/config.yaml", []),
    # structure -> description text; Pearson symbol and Strukturbericht are read from it
    "crystal_pearson_scifm": (EXP / "crystal_prototypes/config.yaml", []),
    "freesolv_iupac_scifm": (
        EXP / "freesolv/config.yaml",
        [*FREESOLV_TEXT, "--model.model.backbone.max_length=128", "--trainer.max_steps=120"],
    ),
    # name -> property: the IUPAC name as text, no <mol>; same scaffold split (from the SMILES)
    "freesolv_name_scifm": (
        EXP / "freesolv/config.yaml",
        [
            "--data.init_args.template=freesolv_name_property",
            "--data.init_args.molecule_columns=[]",
            "--data.init_args.scaffold_column=smiles",
            "--model.model.backbone.max_length=96",
        ],
    ),
    # the same FreeSolv run with head.standardize (learn (y - mean) / std; off in the runs above)
    "freesolv_scifm_standardized": (EXP / "freesolv/config.yaml", ["--model.model.head.standardize=true"]),
    # CPU budget: 40 steps, and CIFs generated for the first 16 test formulas only
    "cif_generation_scifm": (
        EXP / "crystal_prototypes/cif_generation.yaml",
        [],
        ["--data.init_args.batch_size=8", "--trainer.limit_predict_batches=2"],
    ),
    # two more training seeds (model init, dropout); the split and data order stay those of seed 0
    "freesolv_scifm_seed1": (EXP / "freesolv/config.yaml", ["--seed_everything=1"]),
    "freesolv_scifm_seed2": (EXP / "freesolv/config.yaml", ["--seed_everything=2"]),
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(RUNS):
        config, overrides, *predict = RUNS[name]
        print(run_scifm(name, config, overrides, predict_overrides=predict[0] if predict else ()), flush=True)
