"""Packing examples into rows without padding waste or attention across examples.

Several short examples share one row; each restarts its ``position_ids`` at 0, which
transformers turns into a block-diagonal causal mask (an example never sees another),
provided the model is called with no attention mask and no KV cache. Rows are filled
first-fit by decreasing length. Only the positions that predict a target are sent
through the output layer, which on a 50k-token vocabulary is a large share of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.train.encode import Encoded

if TYPE_CHECKING:
    import torch


def pack(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``row_len`` tokens (first fit)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(index)
                room[r] -= size
                break
        else:
            rows.append([index])
            room.append(row_len - size)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    source: torch.Tensor  # [n] flat index (row * length + t - 1) of each target's predictor
    targets: torch.Tensor  # [n] target token ids
    tokens: int  # real (non-padding) tokens

    def to(self, device: str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.source.to(device),
            self.targets.to(device),
            self.tokens,
        )


def make_batches(
    examples: list[Encoded],
    row_len: int,
    tokens_per_batch: int,
    pad_id: int,
    packed: bool = True,
) -> list[Batch]:
    """Pack ``examples`` into rows and group the rows into forward passes.

    Each forward pass holds at most ``tokens_per_batch`` tokens (at least one row).
    With ``packed=False`` every example has a row of its own (for attention kernels that
    ignore the restarting positions); rows of similar length share a pass.
    """
    import torch

    lengths = [len(e.ids) for e in examples]
    if packed:
        rows = pack(lengths, row_len)
    else:
        rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    per_batch = max(1, tokens_per_batch // row_len)
    batches: list[Batch] = []
    for first in range(0, len(rows), per_batch):
        group = rows[first : first + per_batch]
        length = max(sum(len(examples[i].ids) for i in row) for row in group)
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        pos = torch.zeros((len(group), length), dtype=torch.long)
        source: list[int] = []
        targets: list[int] = []
        tokens = 0
        for r, row in enumerate(group):
            at = 0
            for index in row:
                example = examples[index]
                n = len(example.ids)
                ids[r, at : at + n] = torch.tensor(example.ids)
                pos[r, at : at + n] = torch.arange(n)
                for t, is_target in enumerate(example.targets):
                    if is_target:
                        source.append(r * length + at + t - 1)
                        targets.append(example.ids[t])
                at += n
            tokens += at
            if at < length:  # padding: its own "sequence" of positions, never a target
                pos[r, at:] = torch.arange(length - at)
        batches.append(Batch(ids, pos, torch.tensor(source), torch.tensor(targets), tokens))
    return batches
