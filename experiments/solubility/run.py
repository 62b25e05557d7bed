"""Huuskonen aqueous solubility: RF on Morgan fingerprints vs GINE + head vs scifm (head and text).

python experiments/solubility/run.py     # trains the scifm run first if experiments/run_all.py has not
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import molecule_regression, run_scifm

if __name__ == "__main__":
    run_scifm("solubility_scifm", HERE / "config.yaml")
    molecule_regression(HERE, HERE / "config.yaml", ["solubility_scifm"], unit="log(mol/L)")
