# train.py's val estimate (eval_iters batches of random windows of val.bin, drawn from the seed)
# against the same loss over every window of val.bin, for a run's checkpoint (docs/tuning.md
# section 21): how far the windows a seed draws move the figure. fp32.
#   python docs/tuning/estimate_windows.py OUT_DIR DATA_DIR   (DATA_DIR: the tok* folder it trained on)
import math, os, sys
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from checkpoint import load_checkpoint, model_from_checkpoint
from data import load_meta

out_dir, data_dir = sys.argv[1:3]
eval_iters, batch_size = 20, 16  # config/tinystories_cpu.py's
model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'ckpt.pt')), out_dir).eval()
meta = load_meta(data_dir)
ids = torch.from_numpy(np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=np.uint16).astype(np.int64))
T, to_bpb = model.config.block_size, 1 / math.log(2) / (meta['val_bytes'] / meta['val_tokens'])


@torch.no_grad()
def loss(starts):  # mean loss of the windows starting at `starts`, as train.py scores them
    x = torch.stack([ids[s:s + T] for s in starts])
    return model(x, torch.stack([ids[s + 1:s + T + 1] for s in starts]))[1].item()


every = list(range(0, len(ids) - T - 1, T))
total = sum(loss(every[i:i + batch_size]) * len(every[i:i + batch_size]) for i in range(0, len(every), batch_size))
print(f"every window ({len(every)}): {total / len(every) * to_bpb:.4f} bits/byte")
for seed in (1337, 7, 1, 2, 3):
    gen = torch.Generator().manual_seed(seed + 1)  # train.py's estimate_loss
    draws = [torch.randint(len(ids) - T - 1, (batch_size,), generator=gen).tolist() for _ in range(eval_iters)]
    print(f"seed {seed:>4}'s {eval_iters} x {batch_size} windows: {sum(map(loss, draws)) / eval_iters * to_bpb:.4f} bits/byte")
