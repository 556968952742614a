# train.py's val estimate (eval_iters batches of random windows of val.bin, drawn from the seed)
# against the same loss over every window of val.bin, for a run's checkpoint (docs/tuning.md
# section 21): how far the windows a seed draws move the figure. fp32.
#   python docs/tuning/estimate_windows.py OUT_DIR DATA_DIR [eval_iters batch_size]
import json, math, os, sys
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from checkpoint import load_checkpoint, model_from_checkpoint

out_dir, data_dir = sys.argv[1:3]
eval_iters, batch_size = (int(a) for a in sys.argv[3:5]) if len(sys.argv) > 4 else (20, 16)
model = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, 'ckpt.pt')), out_dir).eval()
meta = json.load(open(os.path.join(data_dir, 'meta.json')))
ids = torch.from_numpy(np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=np.uint16).astype(np.int64))
T, to_bpb = model.config.block_size, 1 / math.log(2) / (meta['val_bytes'] / meta['val_tokens'])


@torch.no_grad()
def loss(starts):  # mean loss of the windows starting at `starts`, as train.py scores them
    x = torch.stack([ids[s:s + T] for s in starts])
    return model(x, torch.stack([ids[s + 1:s + T + 1] for s in starts]))[1].item()


every = list(range(0, len(ids) - T - 1, T))
print(f"every window ({len(every)}): {sum(loss(every[i:i + 16]) * len(every[i:i + 16]) for i in range(0, len(every), 16)) / len(every) * to_bpb:.4f} bits/byte")
for seed in (1337, 7, 1, 2, 3):
    gen = torch.Generator().manual_seed(seed + 1)  # train.py's estimate_loss
    draws = [torch.randint(len(ids) - T - 1, (batch_size,), generator=gen).tolist() for _ in range(eval_iters)]
    print(f"seed {seed:>4}'s {eval_iters} x {batch_size} windows: {sum(map(loss, draws)) / eval_iters * to_bpb:.4f} bits/byte")
