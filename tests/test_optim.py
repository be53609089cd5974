import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.training.optim import learning_rate, parameter_groups


def schedule(kind: str) -> OptimConfig:
    return OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=kind)


def test_warmup_is_linear_from_the_first_step():
    cfg = schedule("cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(4, cfg, 110) == pytest.approx(0.5)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)


def test_cosine_decay_values():
    cfg = schedule("cosine")
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(35, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)  # stays at the floor


def test_linear_and_constant_decay_values():
    assert learning_rate(60, schedule("linear"), 110) == pytest.approx(0.55)
    assert learning_rate(110, schedule("linear"), 110) == pytest.approx(0.1)
    assert learning_rate(60, schedule("constant"), 110) == pytest.approx(1.0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = torch.nn.ModuleDict({
        "embedding": torch.nn.Embedding(10, 4),
        "proj": torch.nn.Linear(4, 4, bias=True),
        "norm": torch.nn.LayerNorm(4),
    })
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, bias, norm weight and bias
