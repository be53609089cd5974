"""Weighted blending of several corpora into one indexable sample sequence.

Sample i of the blend is drawn from the corpus whose share so far lags its
weight the most (Megatron's BlendedDataset rule), so after n samples every
corpus has supplied within one sample of weight × n: the ratios hold on every
prefix, not just on average. The schedule depends only on the weights, so the
loader's global sample index is still its whole state.
"""

from __future__ import annotations

import numpy as np


class BlendedDataset:
    _BLOCK = 1 << 16

    def __init__(self, datasets: list, weights: list[float]):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"data.blend: {len(datasets)} corpora but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data.blend weights {weights}: expected non-negative with a positive sum")
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.corpus = np.zeros(0, dtype=np.int16)  # which corpus supplies sample i
        self.within = np.zeros(0, dtype=np.int64)  # its index within that corpus
        self._counts = np.zeros(len(datasets), dtype=np.int64)
        self.seq_len = datasets[0].seq_len

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _extend(self, upto: int) -> None:
        n0 = len(self.corpus)
        n1 = max(upto + 1, n0 + self._BLOCK)
        corpus = np.empty(n1 - n0, dtype=np.int16)
        within = np.empty(n1 - n0, dtype=np.int64)
        counts = self._counts
        for j, i in enumerate(range(n0, n1)):
            k = int(np.argmax(self.weights * (i + 1) - counts))
            corpus[j], within[j] = k, counts[k]
            counts[k] += 1
        self.corpus = np.concatenate([self.corpus, corpus])
        self.within = np.concatenate([self.within, within])

    def __getitem__(self, index: int) -> np.ndarray:
        if index >= len(self.corpus):
            self._extend(index)
        return self.datasets[self.corpus[index]][int(self.within[index])]

    def collate(self, samples: list[np.ndarray]):
        return self.datasets[0].collate(samples)
