"""train.py with one fault injected into one process, for the tests (not a test itself).

FAULT=nan: the training loss is NaN from step FAULT_AFTER + 1 on. FAULT=save: every checkpoint
write after the FAULT_AFTER-th fails as on a full disk. FAULT=slow: every checkpoint write and
every protocol scoring takes FAULT_AFTER seconds longer; with FAULT_LOG=DIR each process writes
DIR/exit.RANK (when it exits) and the faulty one DIR/busy (when each slow call ended).
FAULT_RANK: the process (default 0).
    FAULT=nan FAULT_AFTER=3 python tests/fault.py --max_iters=10 ...
"""
import atexit
import os
import runpy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model  # noqa: E402
import protocol  # noqa: E402

rank, log = int(os.environ.get('RANK', 0)), os.environ.get('FAULT_LOG')
if log:
    atexit.register(lambda: Path(log, f'exit.{rank}').write_text(repr(time.time())))
if rank == int(os.environ.get('FAULT_RANK', 0)):
    after, calls = int(os.environ['FAULT_AFTER']), []
    if os.environ['FAULT'] == 'nan':
        forward = model.GPT.forward

        def nan_forward(self, idx, targets=None, **kw):
            logits, loss = forward(self, idx, targets, **kw)
            if self.training and targets is not None:
                calls.append(1)
                if len(calls) > after:
                    loss = loss * float('nan')
            return logits, loss
        model.GPT.forward = nan_forward
    elif os.environ['FAULT'] == 'save':
        save = torch.save

        def full_disk(obj, f, *args, **kw):
            calls.append(1)
            if len(calls) > after:
                raise OSError(28, 'No space left on device')
            return save(obj, f, *args, **kw)
        torch.save = full_disk
    else:
        def slow(f):
            def slowly(*args, **kw):
                time.sleep(after)
                out = f(*args, **kw)
                if log:
                    with open(Path(log, 'busy'), 'a') as busy:
                        busy.write(f"{time.time()!r}\n")
                return out
            return slowly
        torch.save, protocol.score = slow(torch.save), slow(protocol.score)

sys.argv = [str(ROOT / 'train.py')] + sys.argv[1:]
runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
