"""Reference-model log-probs, computed once per dataset and cached in the run folder.

DPO-style losses compare the policy with a frozen reference on the same sequences. The
reference never changes, so scoring it again every step would spend a second forward pass
per micro-batch on numbers that are already known. Instead one no-grad pass over every
sequence of the dataset runs before training (batched and packed, in the precision the
training uses), and the summed log-probs are saved to `run_dir/reference_logps.pt` under a
key that hashes (reference model identity, every token id and label, precision). A resumed
run with the same key loads the file; a change of data, model or precision recomputes it.

Layout: each training item owns exactly two sequences (chosen and rejected for a pair; for
KTO the completion and its mismatched prompt–completion sequence), so a split is stored as
an (N, 2) float32 tensor, column 0 the first sequence, column 1 the second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rlhfkit.data.batches import LMBatch
from rlhfkit.data.packing import collate
from rlhfkit.data.tokenize import Encoded
from rlhfkit.ops.logprobs import sequence_logprobs

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.pt"
# Bump when the meaning of the cached numbers changes, so old files are recomputed.
CACHE_FORMAT = 1


def model_identity(name_or_path: str, *, seed: int = 0) -> str:
    """A string that changes when the weights behind `name_or_path` change.

    Local folders add the size and modification time of their weight and config files (the
    path alone would not notice a checkpoint overwritten in place); the random `tiny` test
    model adds its seed; a hub id is taken as is.
    """
    if name_or_path == "tiny":
        return f"tiny(seed={seed})"
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    stamps = []
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            stamps.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{folder.resolve()}|{'|'.join(stamps)}"


def reference_key(reference_id: str, splits: dict[str, Sequence[Encoded]], precision: str) -> str:
    """sha256 over the reference identity, the precision and every token id and label."""
    digest = hashlib.sha256()
    digest.update(f"format={CACHE_FORMAT}\0reference={reference_id}\0precision={precision}\0".encode())
    for name in sorted(splits):
        digest.update(f"split={name}:{len(splits[name])}\0".encode())
        for seq in splits[name]:
            digest.update(np.asarray(seq.input_ids, dtype=np.int64).tobytes())
            digest.update(b"|")
            digest.update(np.asarray(seq.labels, dtype=np.int64).tobytes())
            digest.update(b"\0")
    return digest.hexdigest()


def sum_by_sequence(token_logps: Tensor, batch: LMBatch, count: int) -> Tensor:
    """(count,) sums of token log-probs over each sequence's response tokens.

    token_logps: (B, T) from `TokenLogprobs`; packed rows are summed by segment id,
    padded rows (B = count) row by row.
    """
    if batch.packed:
        return sequence_logprobs(token_logps, batch.loss_mask, batch.segment_ids, count)
    return sequence_logprobs(token_logps, batch.loss_mask)


def sequence_sums(policy: nn.Module, batch: LMBatch, count: int) -> Tensor:
    """(count,) summed response log-probs of the batch's sequences under `policy` (a
    `TokenLogprobs`): one forward pass, whatever the number of sequences."""
    return sum_by_sequence(policy(batch), batch, count)


@torch.no_grad()
def score_sequences(policy: nn.Module, sequences: Sequence[Encoded], *, batch_size: int, pad_id: int,
                    packing: bool, device: torch.device | str) -> Tensor:
    """Σ_t log π(y_t | x, y_<t) over each sequence's response tokens: (N,) float32 on the CPU.

    `policy` is a `TokenLogprobs` module (batch → (B, T) token log-probs). Sequences are
    scored `batch_size` at a time, in one packed row each (or right-padded, grouped by
    length, when `packing` is False). Runs under no_grad in whatever autocast the caller set.
    """
    n = len(sequences)
    out = torch.zeros(n, dtype=torch.float32)
    order = list(range(n)) if packing else sorted(range(n), key=lambda i: len(sequences[i]))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        group = [sequences[i] for i in idx]
        batch = collate(group, pad_id, packed=packing).to(device)
        out[torch.tensor(idx)] = sequence_sums(policy, batch, len(group)).float().cpu()
    return out


def compute_reference_logps(reference: nn.Module, splits: dict[str, Sequence[tuple[Encoded, Encoded]]], *,
                            batch_size: int, pad_id: int, packing: bool, device: torch.device | str,
                            rank: int = 0, world_size: int = 1,
                            gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The reference pass: {split: (N, 2) summed log-probs of each item's two sequences}.

    With several processes each one scores every `world_size`-th sequence and `gather`
    (an all-gather of equal-length 1-D tensors, e.g. `accelerator.gather`) assembles the
    whole, so the pass takes 1/world_size of the time and every process gets the result.
    """
    out = {}
    for name, items in splits.items():
        flat = [seq for item in items for seq in item]
        shard = flat[rank::world_size]
        scores = score_sequences(reference, shard, batch_size=batch_size, pad_id=pad_id,
                                 packing=packing, device=device)
        if world_size > 1:
            per_rank = -(-len(flat) // world_size)  # ceil: gather needs equal lengths
            padded = torch.zeros(per_rank, dtype=torch.float32)
            padded[:len(scores)] = scores
            # gathered[r·per_rank + k] is sequence r + k·world_size.
            gathered = gather(padded.to(device)).cpu().view(world_size, per_rank)
            scores = gathered.T.reshape(-1)[:len(flat)]
        out[name] = scores.view(len(items), 2)
    return out


def load_cached(path: Path, key: str) -> dict[str, Tensor] | None:
    """The cached splits when `path` holds a cache made under `key`, else None."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torn or foreign: recompute
        log.warning("ignoring unreadable reference cache %s (%s)", path, e)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        log.info("reference cache %s was made for other data, model or precision: recomputing", path)
        return None
    return dict(blob["splits"])


def save_cache(path: Path, key: str, splits: dict[str, Tensor], meta: dict[str, str | int]) -> None:
    """Write atomically, so a run killed mid-write never leaves a torn cache behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"key": key, "format": CACHE_FORMAT, "splits": splits, "meta": meta}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
