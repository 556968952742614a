# Every other training story of a prepared data directory, with its tokenizer, val and test kept:
# the recipe on half the stories (docs/tuning.md section 13):
#   python docs/tuning/half_stories.py data-v12/tok4096 data-half/tok4096
import os, shutil, sys
import numpy as np
import sentencepiece as spm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # data.py
from data import load_meta, story_ids, write_json

src, dst = sys.argv[1:3]
meta = load_meta(src)
os.makedirs(dst, exist_ok=True)
for name in (meta['tokenizer_model'], 'tokenizer.vocab', 'val.bin', 'test.bin'):
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
stories = list(story_ids(src, 'train', meta['bos_id']))[::2]
np.concatenate(stories).astype(np.uint16).tofile(os.path.join(dst, 'train.bin'))
sp = spm.SentencePieceProcessor(model_file=os.path.join(src, meta['tokenizer_model']))
nbytes = sum(len(sp.decode(s[1:-1].tolist()).encode()) for s in stories)  # without BOS and EOS
meta.update(train_tokens=sum(map(len, stories)), train_bytes=nbytes, train_stories=len(stories),
            source=meta['source'] + ' (every other training story)')
write_json(meta, os.path.join(dst, 'meta.json'))
print(f"{len(stories):,} stories, {meta['train_tokens']:,} tokens, {nbytes:,} bytes -> {dst}")
