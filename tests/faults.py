"""The trainer with a crash injected, for the restart and failure tests; the hook lives here, not in the trainer.

    python tests/faults.py train --config ...    # what `python -m weighted_mtp train ...` does, plus the fault

WMTP_TEST_FAULT=<rank>:<step> makes that rank raise once, in torchrun's first attempt, right after that step
(before the step's flags are read, a checkpoint is written or a metric is logged).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import weighted_mtp  # noqa: E402  (after the path)


def failing_once(after):
    def after_with_fault(self, done, flags, last):
        rank = int(os.environ.get("RANK", "0"))
        if (os.environ.get("WMTP_TEST_FAULT") == f"{rank}:{done}"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            raise RuntimeError(f"WMTP_TEST_FAULT: rank {rank} fails once at step {done}")
        return after(self, done, flags, last)
    return after_with_fault


weighted_mtp.StepFlags.after = failing_once(weighted_mtp.StepFlags.after)

if __name__ == "__main__":
    weighted_mtp.entry()
