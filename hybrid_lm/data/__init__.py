"""Data pipeline: document sources -> byte-level BPE -> cached token streams -> packed batches with cu_seqlens.

    prepared = prepare_data(DataConfig(source="shakespeare"))
    batches = PackedBatches(prepared.train, seq_len=512, batch_size=8, eos_id=prepared.eos_id)
    batch = next(batches)  # input_ids/labels [1, B*T], cu_seqlens [N+1], num_tokens
"""

from .config import DataConfig, PreparedData
from .corpus import OptionalDependencyError, load_documents, shakespeare_documents
from .packing import PackedBatches, iter_eval_batches
from .prepare import prepare_data
from .tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DataConfig", "PreparedData", "prepare_data", "PackedBatches", "iter_eval_batches",
    "OptionalDependencyError", "load_documents", "shakespeare_documents",
    "EOS_TOKEN", "load_tokenizer", "train_bpe_tokenizer",
]
