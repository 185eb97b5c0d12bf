"""The PyTorch models that tests/golden/make_onnx_exporters.py exports and tests/test_onnx_exporters.py
loads the exported files back into (needs only torch)."""

from __future__ import annotations

import torch
from torch import nn

F = 3  # input features of every model


class Mixed(nn.Module):
    """Conv1d -> bidirectional GRU -> LSTM -> Linear (batch first); kept equal to the test file's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(F, 4, 3, padding=1)
        self.gru = nn.GRU(4, 3, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(6, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.fc(self.lstm(self.gru(h)[0])[0])


class Shared(nn.Module):
    """One Linear applied twice, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.tanh(self.fc(self.embed(ids)))))
