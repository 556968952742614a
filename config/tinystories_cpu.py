# The recipe for the full TinyStories that `python prepare.py` downloads (2.1M stories, about
# 470M tokens at vocab 4096), for about an hour of a 2-4 core laptop CPU:
#   python prepare.py
#   python train.py config/tinystories_cpu.py
# 6 layers x 256 wide, vocab 4096, 5.77M parameters; 2,400 iterations of 16 x 256 tokens, Muon
# for the matrices inside the blocks: config/tinystories_cpu_small.py's model and optimiser,
# without its regularisation.
# Measured (2-vCPU AMD EPYC Zen 3 VM, torch 2.13 CPU, fp32): that model and optimiser reach 0.9030
# bits per byte on the held-out test split after 2,100 steps over the 2 MB sample (with GPT-2's
# init; model.py now starts the residual projections at zero, 0.6-0.9 % better on the small
# recipe's data: docs/tuning.md section 10).
# Its step on a 2-vCPU AMD EPYC Zen 4 VM (AVX512-BF16, so dtype='auto' trains in bf16 autocast),
# torch 2.13 CPU, 2026-12-04: 0.81-0.97 s (train.py's own log); its first steps estimated the
# whole run at 42 minutes, and 1,750 steps with 8 evaluations took 27.8 minutes (on the 2 MB
# sample, where this recipe memorises without dropout and stopped early). In fp32 on the same
# CPU the step takes 1.3-1.7 s (docs/benchmarks.md).
# Measured on the 15,042 real stories of ../shared (V1's sample, V2's train.txt and train-more.txt,
# 3.07M tokens, read about 3 times; the commands in docs/tuning.md section 14), bf16 on a 2-vCPU
# AMD EPYC Zen 4 VM, 2,400 steps: test 0.7708 bits per byte (val 0.7646), and 0.6883 on V2's
# 5,448 validation stories (python eval.py --text=../shared/tinystories-v2/valid.txt); val still
# fell at the last evaluations (0.8227, 0.8152, 0.8121 at 2,000, 2,250 and 2,400).
# Reasoned, not yet measured on the full dataset:
# - 2,400 steps read 9.8M tokens, 2 % of the data: nothing repeats, so there is nothing to
#   memorise. Dropout goes (a faster step) and weight decay is the usual 0.1.
# - At equal steps, new text teaches at least as much as text seen 17 times (Muennighoff et al.
#   2023: beyond about 4 passes, repeated data is worth less than new), so this run should reach
#   the small recipe's figure or better on the full data's test split.
# - Of docs/tuning.md section 10's changes, the zero-initialised projections (model.py's init)
#   apply here too. Batch 8 and an untied output layer lost on the small data; the tied one
#   helps as a regulariser of text read 10 times, which the full data may not need (not measured).
# - Hoffmann et al. 2022 (~20 tokens per parameter) would pick a model of about 0.5M parameters
#   for 10M tokens, but that rule was fitted far above this scale; the model that measured best
#   on the sample stays.
out_dir = 'out'
vocab_size = 4096
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256         # a whole story: 220 tokens on average
batch_size = 16
dropout = 0.0
weight_decay = 0.1
muon = True
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
max_iters = 2400
lr_decay_iters = 2400
eval_interval = 250
eval_iters = 20
patience = 4
device = 'cpu'
