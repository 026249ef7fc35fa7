"""Small models for the experiments. Every model names its output layer ``classifier``
(images) or ``decoder`` (language) and its input layer ``features`` / ``encoder``, so
per-layer drop rates can address them by name (``layer_rates="classifier=0.2"``)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "CNN", "ResNet", "LSTMLM", "TransformerLM", "build_image_model", "build_lm"]


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int, classes: int, dropout: float = 0.0):
        super().__init__()
        mods: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
            d = hidden
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """Two conv-pool blocks and a hidden fully connected layer."""

    def __init__(self, in_ch: int, size: int, classes: int, width: int = 16, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 2 * width * (size // 4) ** 2
        self.hidden = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout) if dropout > 0 else nn.Identity())
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(x)))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): ``layers`` blocks per stage, 3 stages (layers=3: ResNet-20)."""

    def __init__(self, in_ch: int, classes: int, width: int = 16, layers: int = 3, dropout: float = 0.0):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for stage in range(3):
            for b in range(layers):
                cout = width * 2**stage
                mods.append(_Block(c, cout, 2 if (b == 0 and stage > 0) else 1))
                c = cout
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_image_model(cfg, shape: tuple[int, ...], classes: int) -> nn.Module:
    if cfg.model == "mlp":
        return MLP(math.prod(shape), cfg.hidden, cfg.layers, classes, cfg.dropout)
    if cfg.model == "cnn":
        return CNN(shape[0], shape[-1], classes, cfg.width, cfg.hidden, cfg.dropout)
    if cfg.model == "resnet":
        return ResNet(shape[0], classes, cfg.width, cfg.layers, cfg.dropout)
    raise ValueError(f"model {cfg.model!r} is not an image model (mlp, cnn, resnet)")


class LSTMLM(nn.Module):
    """Word- or character-level LSTM language model in the shape of Zaremba et al.'s small PTB model."""

    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(emb, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab)
        if tie:
            if emb != hidden:
                raise ValueError(f"tie_weights needs emb == hidden, got emb={emb}, hidden={hidden}")
            self.decoder.weight = self.encoder.weight
        for p in self.parameters():  # Zaremba et al.: uniform init in [-0.1, 0.1]
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, x: torch.Tensor, state=None):
        h, state = self.rnn(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(h)), state


class TransformerLM(nn.Module):
    """A small causal (GPT-style, pre-norm) transformer language model."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab)
        self.drop = nn.Dropout(dropout)
        if tie:
            self.decoder.weight = self.encoder.weight
        self.register_buffer("mask", torch.triu(torch.full((context, context), float("-inf")), 1), persistent=False)

    def forward(self, x: torch.Tensor, state=None):
        t = x.shape[1]
        h = self.drop(self.encoder(x) + self.pos[:t])
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.decoder(self.norm(h)), None


def build_lm(cfg, vocab: int) -> nn.Module:
    if cfg.model == "lstm":
        return LSTMLM(vocab, cfg.emb, cfg.hidden, cfg.layers, cfg.dropout, cfg.tie_weights)
    if cfg.model == "transformer":
        return TransformerLM(vocab, cfg.emb, cfg.heads, cfg.layers, cfg.bptt, cfg.dropout, cfg.tie_weights)
    raise ValueError(f"model {cfg.model!r} is not a language model (lstm, transformer)")
