"""Rebuilds tokenizer.json here: a 512-token byte-level BPE trained on the standard library's code, so that the
tiny models run with a real tokenizer and no download. Run from anywhere: python make_tokenizer.py"""
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from semalign_ds.embedded import stdlib_functions  # noqa: E402

texts = [r["prompt"] + r["response"] for r in stdlib_functions()[:3000]]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(texts, trainer)
tok.save(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.json"))
print("vocab", tok.get_vocab_size())
