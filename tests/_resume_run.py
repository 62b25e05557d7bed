"""``scifm fit`` in a subprocess for tests/test_reliability.py, with a per-step loss record.

    python tests/_resume_run.py fit --config ... [CLI args]

Environment:
    SCIFM_TEST_LOSSES  a JSON-lines file; each finished training step appends
                       ``{"step": global_step, "loss": float.hex(loss)}`` (exact bits).
    SCIFM_TEST_SLEEP   seconds to sleep at the end of each step (gives a test time to signal).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from scifm.cli import main
from scifm.module import ScifmModule

_original_end = ScifmModule.on_train_batch_end


def _recording_end(self: ScifmModule, outputs: Any, batch: Any, batch_idx: int) -> None:
    _original_end(self, outputs, batch, batch_idx)
    loss = outputs["loss"] if isinstance(outputs, dict) and "loss" in outputs else None
    row = {"step": self.trainer.global_step, "loss": None if loss is None else float(loss).hex()}
    with open(os.environ["SCIFM_TEST_LOSSES"], "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    time.sleep(float(os.environ.get("SCIFM_TEST_SLEEP", "0")))


ScifmModule.on_train_batch_end = _recording_end  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
