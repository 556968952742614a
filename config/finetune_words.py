# Fine-tune a trained model on the Words task (words.py): stories that use the given words.
#   python words.py                                   # the task's splits, from data/tok4096
#   (after a small corpus that the model knows by heart: --train_text=FILE of other stories)
#   python train.py config/finetune_words.py --init_from=out/ckpt.pt                 # every weight
#   python train.py config/finetune_words.py --init_from=out/ckpt.pt --lora_rank=8 \
#          --learning_rate=2e-3 --min_lr=2e-4 --out_dir=out-words-lora8              # LoRA
#   python words.py --score=out-words                 # word use on held-out prompts
# The model's shape and tokenizer come from the checkpoint in init_from. Measured in
# docs/finetune.md: what each of these gains in word use and loses on plain stories.
data_dir = 'data/words'
out_dir = 'out-words'
batch_size = 16
block_size = 256
dropout = 0.0
weight_decay = 0.0
muon = False             # AdamW: LoRA's factors are not Muon's kind of matrix
learning_rate = 3e-4     # full fine-tuning; LoRA takes a larger one (above)
min_lr = 3e-5
warmup_iters = 20
max_iters = 200
lr_decay_iters = 200
eval_interval = 50
eval_iters = 10
device = 'cpu'
