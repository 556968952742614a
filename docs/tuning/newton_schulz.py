# Muon's Newton-Schulz at the CPU config's shapes (docs/benchmarks.md, the training step): the
# time of 3, 4 and 5 steps for a training step's 24 block matrices, and, given a checkpoint of a
# Muon run, how far 3 and 4 steps land from 5 on its momentum matrices (in bf16 too where the CPU
# has it natively, as Muon runs it there):
#   python docs/tuning/newton_schulz.py [out/last.pt]
import os, statistics, sys, time
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # muon.py
from common import native_bf16
from muon import orthogonalize

shapes = [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 6  # c_attn, c_proj, c_fc, c_proj
Gs = [torch.randn(s) for s in shapes]
for dtype in (torch.bfloat16, torch.float32) if native_bf16() else (torch.float32,):
    for steps in (5, 4, 3):
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            for G in Gs:
                orthogonalize(G, steps, dtype)
            times.append(time.perf_counter() - t0)
        print(f"{str(dtype)[6:]:>8} {steps} steps: {statistics.median(times[1:]) * 1000:6.1f} ms a training step")
if len(sys.argv) > 1:  # the momentum of a Muon run, as its optimizer state holds it
    state = torch.load(sys.argv[1], weights_only=True)['optimizer']['state'].values()
    for buf in [s['momentum'] for s in state if 'momentum' in s][:4]:
        ref = orthogonalize(buf, 5)
        line = [f"{tuple(buf.shape)}"]
        for steps in (4, 3):
            o = orthogonalize(buf, steps)
            sv = torch.linalg.svdvals(o)
            cos = torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), dim=0)
            line.append(f"{steps} steps: cosine {cos:.3f} with 5, singular values below 0.5: {(sv < 0.5).float().mean():.0%}")
        print('  '.join(line))
