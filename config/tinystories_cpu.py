# The recipe for the full TinyStories that `python prepare.py` downloads (2.1M stories, about
# 470M tokens at vocab 4096), for about an hour of a 2-4 core laptop CPU:
#   python prepare.py
#   python train.py config/tinystories_cpu.py
# 6 layers x 256 wide, vocab 4096, 5.77M parameters; 2,400 iterations of 16 x 256 tokens, Muon
# for the matrices inside the blocks: config/tinystories_cpu_small.py's model and optimiser,
# without its regularisation: 2,400 steps read 9.8M tokens, 2 % of the data, so nothing repeats.
# Measured on the real stories of ../shared laid out as the hub's (training stories in the
# folder's files, the validation stories in valid.txt: V1's, split into val and test as prepare.py
# splits the hub's), 15,042 training stories, 3.07M tokens, each read about 3 times:
#   mkdir stories && cp ../shared/tinystories/*.txt stories/ \
#     && cp ../shared/tinystories-v2/train.txt stories/v2_train.txt \
#     && cp ../shared/tinystories-v2/train-more.txt stories/v2_train-more.txt
#   python prepare.py --source=stories                         2 s
#   python train.py config/tinystories_cpu.py                  0.96-1.01 s a step (bf16; 41.4 min on half of them)
#   python eval.py                                             test 0.7708 bits per byte (val 0.7646)
#   python eval.py --text=../shared/tinystories-v2/valid.txt  0.6883 on V2's 5,448 validation stories
# on a 2-vCPU AMD EPYC Zen 4 VM (AVX512-BF16, so dtype='auto' trains in bf16 autocast), torch
# 2.13 CPU; 23.0 minutes and test 0.7721 on a Zen 5 VM. In fp32 the step takes about 1.5 times
# as long (docs/benchmarks.md).
# The data curve (docs/tuning.md section 15): the same run on 1/2, 1/4 and 1/8 of these stories
# reaches test 0.8573, 0.9954 and 1.1276 (0.7666, 0.8979, 1.0391 on V2's): each doubling of the
# stories gains 10-14 %. Without dropout this model stops learning from text read about 5 times,
# and train.py says so beyond 4 passes; for such corpora: config/tinystories_cpu_small.py, which
# wins on 7,521 stories (test 0.8314 against 0.8573) and on V1 + V2's 4,042 (0.8428 against this
# recipe's 0.9460) and loses on the 15,042 (0.8146 against 0.7708; docs/tuning.md section 16).
# Predicted for the full dataset, where nothing repeats (not measured: the price of 3.2 passes
# against one, measured step by step between these runs, is 4-8 %): test 0.71-0.74 bits per
# byte and 0.64-0.66 on V2's validation stories, in the same 2,400 steps. A power law fitted to
# the four points does not pin it down (section 15 says why).
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
