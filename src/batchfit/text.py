"""Text for language models: pretrained Hugging Face models loaded offline, tokenised shards, corpora.

Reached as ``bf.text``::

    import batchfit as bf

    model = bf.text.load_pretrained("smollm2", task="causal_lm", lora_rank=8)
    tokenizer = bf.text.load_tokenizer("smollm2")
    train = bf.text.write_text_shards("data/train.jsonl", "shards/train", tokenizer, text_column="text")
    trainer = bf.Trainer(model, None, optimizer, batch_size=32, micro_batch_tokens="auto")

``load_pretrained`` loads a *pretrained* model (``bf.load_model`` loads a model batchfit saved).
The names ``bf.load_text_model``, ``bf.load_tokenizer``, ``bf.prepare_corpus``,
``bf.write_text_shards`` and ``bf.find_micro_batch_tokens`` still work.
"""

from .data.text import load_tokenizer, write_text_shards
from .measure.memory import find_micro_batch_tokens
from .workloads.text import load_text_model, prepare_corpus

load_pretrained = load_text_model

__all__ = ["find_micro_batch_tokens", "load_pretrained", "load_text_model", "load_tokenizer", "prepare_corpus",
           "write_text_shards"]
