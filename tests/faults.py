"""The trainer with a crash injected, for the restart and failure tests; the hook lives here, not in the trainer.

    python tests/faults.py train --config ...    # what `python -m weighted_mtp train ...` does, plus the fault

WMTP_TEST_FAULT=<rank>:<step> makes that rank raise once, in torchrun's first attempt, right after that step
(before the step's flags are read, a checkpoint is written or a metric is logged). With WMTP_TEST_SNAPSHOT=<file>,
every rank first joins in gathering the weights as they are then (as checkpoint_final.pt holds them) and rank 0
writes them to that file: the weights of an uninterrupted run at that step, for a resumed one to be compared with.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import weighted_mtp  # noqa: E402  (after the path)
from wmtp.parallel import full_state  # noqa: E402

trained = []  # [model, optimizer] of the newest train_step


def remembering(train_step):
    def train_step_remembered(pipeline, model, optimizer, *args, **kwargs):
        trained[:] = [getattr(model, "module", model), optimizer]  # under DDP, the module it wraps
        return train_step(pipeline, model, optimizer, *args, **kwargs)
    return train_step_remembered


def failing_once(after):
    def after_with_fault(self, done, flags, last):
        rank = int(os.environ.get("RANK", "0"))
        fault_rank, _, fault_step = os.environ.get("WMTP_TEST_FAULT", "").partition(":")
        if fault_step == str(done) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            if os.environ.get("WMTP_TEST_SNAPSHOT"):
                weights, _, _ = full_state(*trained)  # a collective under FSDP: every rank gathers
                if rank == 0:
                    torch.save(weights, os.environ["WMTP_TEST_SNAPSHOT"])
            if fault_rank == str(rank):
                raise RuntimeError(f"WMTP_TEST_FAULT: rank {rank} fails once at step {done}")
        return after(self, done, flags, last)
    return after_with_fault


weighted_mtp.train_step = remembering(weighted_mtp.train_step)
weighted_mtp.StepFlags.after = failing_once(weighted_mtp.StepFlags.after)

if __name__ == "__main__":
    weighted_mtp.entry()
