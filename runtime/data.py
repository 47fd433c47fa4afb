"""Training data: seeded synthetic tokens by default, or a text file read as bytes (vocabulary 256).

Every rank can draw the whole global batch of a step from (seed, step) alone, so data parallel ranks take their
own rows without any communication and a one-process reference sees exactly the same tokens.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from planner.specs import ModelSpec, SpecError

BYTE_VOCAB = 256  # a byte-level "tokenizer": every byte value is a token


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"data:{seed}:{step}".encode()).digest()[:8], "little")


class TokenSource:
    """Batches of (tokens, targets), each (rows, seq_len) int64; targets are the tokens shifted by one."""

    def __init__(self, model: ModelSpec, seed: int, text_path: str | Path | None = None):
        self.seq_len, self.vocab_size, self.seed = model.seq_len, model.vocab_size, seed
        self.text: torch.Tensor | None = None
        self.description = f"synthetic tokens (seed {seed})"
        if text_path is not None:
            path = Path(text_path)
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise SpecError(f"--data {path}: cannot read ({e.strerror})") from None
            if model.vocab_size < BYTE_VOCAB:
                raise SpecError(f"--data {path}: byte-level text needs vocab_size >= {BYTE_VOCAB}, "
                                f"model {model.name} has {model.vocab_size}")
            if len(raw) < self.seq_len + 1:
                raise SpecError(f"--data {path}: {len(raw)} bytes is shorter than seq_len + 1 = {self.seq_len + 1}")
            self.text = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
            self.description = f"{path} as bytes ({len(raw)} bytes, seed {seed})"

    def global_batch(self, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole global batch of ``step``."""
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        if self.text is None:
            seqs = torch.randint(0, self.vocab_size, (rows, self.seq_len + 1), generator=gen)
        else:
            starts = torch.randint(0, len(self.text) - self.seq_len, (rows,), generator=gen)
            seqs = torch.stack([self.text[s: s + self.seq_len + 1] for s in starts.tolist()])
        return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()

    def rank_batch(self, step: int, rows: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's contiguous share of the global batch of ``step``."""
        tokens, targets = self.global_batch(step, rows)
        share = rows // dp
        part = slice(dp_rank * share, (dp_rank + 1) * share)
        return tokens[part], targets[part]
