"""The decoding cache: one state dict per layer, filled by the layer's mixer (KV for attention, KV plus index keys
for DSA, conv and recurrent states for Gated DeltaNet), and the number of tokens seen so far."""

from __future__ import annotations


class Cache:
    def __init__(self, num_layers: int):
        self.layers: list[dict] = [{} for _ in range(num_layers)]
        self.seq_len = 0

    def __len__(self) -> int:
        return self.seq_len
