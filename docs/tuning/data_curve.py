# The data curve of docs/tuning.md section 15: a recipe's test bits per byte on corpora of
# different sizes, at the same steps, fitted by L(D) = E + A * D^-alpha (D: training stories;
# E: what the steps reach when nothing repeats) and extrapolated to the full dataset:
#   python docs/tuning/data_curve.py 1881=1.1276 3761=0.9954 7521=0.8573 15042=0.7708
# The range: the fit again with each point's figure redrawn by the run-to-run spread (--noise,
# relative), and with each point left out in turn.
import sys
import numpy as np

full = 2_119_719   # TinyStories' training stories (the hub's train split)
noise = 0.0015     # one run's spread: three runs of one recipe span 0.3 % (docs/tuning.md section 12)
args = [a for a in sys.argv[1:] if not a.startswith('--noise=')]
noise = next((float(a[8:]) for a in sys.argv[1:] if a.startswith('--noise=')), noise)
D, L = np.array([[float(x) for x in a.split('=')] for a in args]).T
if len(D) < 4:
    sys.exit("error: give at least four STORIES=BPB points (three parameters are fitted)")

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

E, A, alpha = fit(D, L)
predict = lambda E, A, alpha, d: E + A * d ** -alpha
print(f"fit: L = {E:.4f} + {A:.4g} * D^-{alpha:.3f}")
for d, l in zip(D, L):
    print(f"  {d:>9,.0f} stories: measured {l:.4f}, fitted {predict(E, A, alpha, d):.4f}")
at_full = predict(E, A, alpha, full)
rng = np.random.default_rng(0)
draws = [predict(*fit(D, L * (1 + noise * rng.standard_normal(len(L)))), full) for _ in range(300)]
lo, hi = np.percentile(draws, [5, 95])
print(f"at {full:,} stories: {at_full:.4f} (90 % of refits with {noise:.2%} noise a point: {lo:.4f}-{hi:.4f})")
for i in range(len(D)):  # with four points, each three are fitted exactly
    keep = np.arange(len(D)) != i
    print(f"  without {D[i]:,.0f}: {predict(*fit(D[keep], L[keep]), full):.4f}")
