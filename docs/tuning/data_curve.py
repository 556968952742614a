# The data curve of docs/tuning.md section 15: a recipe's bits per byte on corpora of different
# sizes, at the same steps, fitted by L(D) = E + A * D^-alpha (D: training stories; E: what the
# steps reach when nothing repeats) and extrapolated to `at` stories:
#   python docs/tuning/data_curve.py --points=1881:1.1276,3761:0.9954,7521:0.8573,15042:0.7708
# The range: the fit again with each figure redrawn by a run's spread (`noise`), and with each
# point left out in turn (from four points on). Section 15 shows where this does not hold.
import os, sys
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # common.py
from common import configure, die

# -----------------------------------------------------------------------------
points = ''              # STORIES:BPB,STORIES:BPB,... (at least three: three parameters are fitted)
at = 2_119_719           # where to extrapolate: TinyStories' training stories (the hub's train split)
noise = 0.0015           # one run's spread: three runs of one recipe span 0.3 % (docs/tuning.md section 12)
# -----------------------------------------------------------------------------
configure(globals())
try:
    D, L = np.array([[float(x) for x in p.split(':')] for p in points.split(',')]).T
except ValueError:
    die(f"--points='{points}' is not STORIES:BPB,STORIES:BPB,...")
if len(D) < 3:
    die("--points needs at least three points: three parameters are fitted")


def fit(D, L):
    """Least squares of E + A * D^-alpha: linear in (E, A) for each alpha of a fine grid."""
    best = None
    for alpha in np.linspace(0.02, 3, 1500):
        X = np.stack([np.ones_like(D), D ** -alpha], 1)
        (E, A), *_ = np.linalg.lstsq(X, L, rcond=None)
        err = ((X @ [E, A] - L) ** 2).sum()
        if A > 0 and (best is None or err < best[0]):
            best = (err, E, A, alpha)
    return best[1:] if best else (np.nan,) * 3


def predict(E, A, alpha, d):
    return E + A * d ** -alpha


E, A, alpha = fit(D, L)
print(f"fit: L = {E:.4f} + {A:.4g} * D^-{alpha:.3f}")
for d, l in zip(D, L):
    print(f"  {d:>9,.0f} stories: measured {l:.4f}, fitted {predict(E, A, alpha, d):.4f}")
rng = np.random.default_rng(0)
draws = [predict(*fit(D, L * (1 + noise * rng.standard_normal(len(L)))), at) for _ in range(300)]
lo, hi = np.percentile(draws, [5, 95])
print(f"at {at:,} stories: {predict(E, A, alpha, at):.4f} "
      f"(90 % of refits with {noise:.2%} noise a point: {lo:.4f}-{hi:.4f})")
if len(D) > 3:  # each three of four points are fitted exactly
    for i in range(len(D)):
        keep = np.arange(len(D)) != i
        print(f"  without {D[i]:,.0f}: {predict(*fit(D[keep], L[keep]), at):.4f}")
