"""Turning a checked dataset into a training file: redaction, de-duplication, split, writing.

The steps, in order:

1. Personal data in every turn is replaced with typed placeholders (``pii.redact``),
   unless the caller turns it off.
2. Exact duplicates go: texts equal after case folding and collapsing whitespace.
3. Near duplicates go: word 3-gram shingle sets with a Jaccard similarity at or above the
   threshold, found with MinHash signatures and LSH banding (sub-quadratic) and confirmed
   by computing the Jaccard similarity of the candidates' shingle sets.
   The first occurrence of a group is the one kept.
4. Each example goes to validation when a seeded hash of its normalized text falls under
   ``val_fraction``: the same input and seed always give the same split, and an example
   keeps its side when others are added or removed. The file order is kept (no shuffle).

De-duplication looks at the redacted text, i.e. at what is written: two messages that
differ only in an e-mail address are the same training example once it is ``<EMAIL>``.
Redaction counts and the review sample cover the examples written, not the dropped ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import InvalidInput
from engine.jobs import JobContext
from engine.paths import atomic_write_bytes
from engine.train.datasets import BadLine, DatasetReport, Example, example_text
from engine.train.pii import person_detector_available, redact

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MAX_VAL_FRACTION = 0.5
SAMPLE_SIZE = 20
REPORT_SUFFIX = ".redactions.json"

_NUM_PERM = 128
_PRIME = (1 << 61) - 1  # Mersenne prime for the universal hashes, as in datasketch
_MAX_HASH = (1 << 32) - 1
_MINHASH_SEED = 1  # fixed: the split seed must not change which duplicates are found
_SHINGLE_ROWS = 4096  # shingles hashed at once, to bound memory on very long texts
_LSH_RECALL = 0.995  # chance that a pair exactly at the threshold becomes a candidate
_CHECK_EVERY = 256
_WORD = re.compile(r"\w+")
_REPORT_NOTE = (
    "This file holds the personal data that was removed, next to its replacement, so "
    "that you can check the redaction. It never leaves this machine; delete it after review."
)


@dataclass(frozen=True)
class RedactionSample:
    """One redacted turn, before and after, for the user's review."""

    line: int
    before: str
    after: str


@dataclass
class PrepareReport:
    """What ``prepare`` did, for ``bastion dataset prepare --json``."""

    examples_in: int
    examples_out: int
    exact_duplicates_removed: int
    near_duplicates_removed: int
    redacted: bool
    redactions: dict[str, int]
    train: int
    validation: int
    out_path: Path
    report_path: Path
    sample: list[RedactionSample] = field(default_factory=list)
    # Lines of the input that could not be read (and so were left out).
    bad_lines: list[BadLine] = field(default_factory=list)

    @property
    def duplicates_removed(self) -> int:
        """Exact and near duplicates together."""
        return self.exact_duplicates_removed + self.near_duplicates_removed

    def to_public(self) -> dict[str, object]:
        """The contract's keys plus the duplicate kinds, the output and report paths."""
        return {
            "examples_in": self.examples_in,
            "examples_out": self.examples_out,
            "duplicates_removed": self.duplicates_removed,
            "redactions": dict(self.redactions),
            "train": self.train,
            "validation": self.validation,
            "exact_duplicates_removed": self.exact_duplicates_removed,
            "near_duplicates_removed": self.near_duplicates_removed,
            "out": str(self.out_path),
            "report_path": str(self.report_path),
            "person_names_redacted": self.person_names_redacted,
            "bad_lines": [{"line": b.line, "error": b.error} for b in self.bad_lines],
        }

    @property
    def person_names_redacted(self) -> bool:
        """Whether names of people were looked for (it needs the optional detector)."""
        return self.redacted and person_detector_available()


def report_path_for(out: Path) -> Path:
    """Where the redaction report of output file ``out`` goes."""
    return out.with_name(out.name + REPORT_SUFFIX)


def prepare(
    report: DatasetReport,
    out: Path,
    redact_pii: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    near_duplicate_threshold: float = 0.9,
    ctx: JobContext | None = None,
) -> PrepareReport:
    """Redact, de-duplicate and split a dataset, and write it as one JSONL file.

    Every kept example is written to ``out`` (atomically) in order, as
    ``{"messages": [...], "split": "train"|"validation"}``, or ``{"text": ..., "split": ...}``
    for plain text. Next to it, ``<out>.redactions.json`` holds the counts by type and up
    to 20 before/after pairs. That report contains the very personal data that was removed
    — that is its purpose, so the user can review the redaction — and, like everything in
    Bastion, stays on this machine.

    Args:
        report: the checked dataset (``read_dataset``); only its good examples are used.
        out: the JSONL file to write; it must not be the input file.
        redact_pii: replace personal data with placeholders (on by default).
        val_fraction: share of examples for validation, in [0, 0.5]; with two examples
            or more and a fraction above 0 there is always at least one.
        seed: changes which examples are chosen for validation.
        near_duplicate_threshold: word 3-gram Jaccard similarity, in (0, 1], from which
            an example is a near duplicate of an earlier one.
        ctx: progress and cancel.

    Returns:
        What was done, with counts.

    Raises:
        InvalidInput: no examples, a parameter out of range, or ``out`` is the input.
        Cancelled: the job was cancelled (nothing is written).
    """
    if not 0 <= val_fraction <= MAX_VAL_FRACTION:
        raise InvalidInput(
            f"the validation fraction must be between 0 and {MAX_VAL_FRACTION}, not {val_fraction}"
        )
    if not 0 < near_duplicate_threshold <= 1:
        raise InvalidInput(
            f"the near-duplicate threshold must be in (0, 1], not {near_duplicate_threshold}"
        )
    if not report.examples:
        raise InvalidInput("the dataset has no examples")
    report_path = report_path_for(out)
    if _same_file(out, report.path) or _same_file(report_path, report.path):
        raise InvalidInput(
            f"{out} is the input file; it would be overwritten", hint="choose another --out"
        )
    ctx = ctx or JobContext()
    total = len(report.examples)

    kept: list[tuple[Example, str, Counter[str]]] = []  # example, normalized text, redactions
    seen: set[bytes] = set()
    near = _NearDuplicates(near_duplicate_threshold)
    exact_removed = near_removed = 0
    for index, original in enumerate(report.examples):
        if index % _CHECK_EVERY == 0:
            ctx.check_cancelled()
            ctx.report(index, total, "removing duplicates and personal data")
        example, counts = _redacted(original) if redact_pii else (original, Counter[str]())
        normalized = normalize(example_text(example))
        digest = hashlib.blake2b(normalized.encode(), digest_size=16).digest()
        if digest in seen:
            exact_removed += 1
            continue
        seen.add(digest)
        if not near.add_if_new(shingles(normalized)):
            near_removed += 1
            continue
        kept.append((example, normalized, counts))
    ctx.check_cancelled()
    ctx.report(total, total, "writing")

    is_validation = _split([normalized for _, normalized, _ in kept], val_fraction, seed)
    lines = [
        _jsonl_line(example, "validation" if val else "train")
        for (example, _, _), val in zip(kept, is_validation, strict=True)
    ]
    redactions: Counter[str] = Counter()
    for _, _, counts in kept:
        redactions.update(counts)
    sample = _sample(report.examples, [example for example, _, _ in kept]) if redact_pii else []
    atomic_write_bytes(out, b"".join(lines))
    atomic_write_bytes(report_path, _report_bytes(redact_pii, redactions, sample))
    n_val = sum(is_validation)
    return PrepareReport(
        examples_in=total,
        examples_out=len(kept),
        exact_duplicates_removed=exact_removed,
        near_duplicates_removed=near_removed,
        redacted=redact_pii,
        redactions=dict(sorted(redactions.items())),
        train=len(kept) - n_val,
        validation=n_val,
        out_path=out,
        report_path=report_path,
        sample=sample,
        bad_lines=list(report.bad_lines),
    )


def normalize(text: str) -> str:
    """The text as compared for duplicates: case-folded, whitespace runs made one space."""
    return " ".join(text.casefold().split())


def shingles(normalized: str) -> frozenset[int]:
    """Hashes of the text's word 3-grams (the whole text when it has fewer than 3 words).

    CRC-32 keeps the hashes stable across processes (``hash`` is salted per process);
    its collisions are rare enough not to move a similarity of many shingles.
    """
    words = _WORD.findall(normalized)
    if len(words) < 3:
        return frozenset({zlib.crc32(" ".join(words).encode())}) if words else frozenset()
    return frozenset(
        zlib.crc32(f"{words[i]} {words[i + 1]} {words[i + 2]}".encode())
        for i in range(len(words) - 2)
    )


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _NearDuplicates:
    """Kept texts' shingle sets, indexed by MinHash LSH bands to find similar ones fast."""

    def __init__(self, threshold: float, num_perm: int = _NUM_PERM) -> None:
        import numpy as np

        self._threshold = threshold
        rng = np.random.default_rng(_MINHASH_SEED)
        self._a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
        self._rows, bands = _bands_for(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._kept: list[frozenset[int]] = []

    def add_if_new(self, shingle_set: frozenset[int]) -> bool:
        """Index ``shingle_set`` and return True, or False when a kept one is too similar."""
        if not shingle_set:
            return True  # nothing to compare (no words); exact de-duplication covers it
        signature = self._signature(shingle_set)
        keys = [
            signature[band * self._rows : (band + 1) * self._rows].tobytes()
            for band in range(len(self._buckets))
        ]
        checked: set[int] = set()
        for band, key in enumerate(keys):
            for candidate in self._buckets[band].get(key, ()):
                if candidate in checked:
                    continue
                checked.add(candidate)
                if jaccard(shingle_set, self._kept[candidate]) >= self._threshold:
                    return False
        index = len(self._kept)
        self._kept.append(shingle_set)
        for band, key in enumerate(keys):
            self._buckets[band].setdefault(key, []).append(index)
        return True

    def _signature(self, shingle_set: frozenset[int]) -> npt.NDArray[np.uint64]:
        import numpy as np

        values = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))
        signature = np.full(self._a.shape, _MAX_HASH, dtype=np.uint64)
        for start in range(0, len(values), _SHINGLE_ROWS):
            rows = values[start : start + _SHINGLE_ROWS, None]
            # uint64 arithmetic wraps on overflow, as in datasketch's MinHash: the result
            # is still a well-mixed permutation proxy, which is all MinHash needs.
            hashed = ((rows * self._a + self._b) % np.uint64(_PRIME)) & np.uint64(_MAX_HASH)
            np.minimum(signature, hashed.min(axis=0), out=signature)
        return signature


def _bands_for(threshold: float, num_perm: int) -> tuple[int, int]:
    """Rows per band and bands: the most rows that still find a pair at the threshold."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= _LSH_RECALL:
            return rows, bands
    return 1, num_perm


def _split(normalized: list[str], val_fraction: float, seed: int) -> list[bool]:
    """Whether each example goes to validation, from a seeded hash of its text."""
    if not normalized or val_fraction <= 0:
        return [False] * len(normalized)
    salt = f"{seed}\x00".encode()
    keys = [
        int.from_bytes(hashlib.blake2b(salt + text.encode(), digest_size=8).digest()) / 2**64
        for text in normalized
    ]
    chosen = [key < val_fraction for key in keys]
    if len(keys) >= 2:
        if not any(chosen):  # small sets: the lowest hash goes, so validation is never empty
            chosen[min(range(len(keys)), key=keys.__getitem__)] = True
        if all(chosen):
            chosen[max(range(len(keys)), key=keys.__getitem__)] = False
    return chosen


def _redacted(example: Example) -> tuple[Example, Counter[str]]:
    counts: Counter[str] = Counter()
    turns: list[tuple[str, str]] = []
    for role, content in example.turns:
        text, found = redact(content)
        counts.update(found)
        turns.append((role, text))
    if not counts:
        return example, counts
    return Example(tuple(turns), example.line, example.fmt), counts


def _sample(originals: list[Example], kept: list[Example]) -> list[RedactionSample]:
    """The first changed turns of the kept examples, up to ``SAMPLE_SIZE``."""
    by_line = {example.line: example for example in originals}
    sample: list[RedactionSample] = []
    for example in kept:
        before = by_line[example.line]
        if before is example:
            continue  # unchanged: ``_redacted`` returns the same object
        for (_, old), (_, new) in zip(before.turns, example.turns, strict=True):
            if old != new:
                sample.append(RedactionSample(example.line, old, new))
                if len(sample) >= SAMPLE_SIZE:
                    return sample
    return sample


def _jsonl_line(example: Example, split: str) -> bytes:
    record: dict[str, object]
    if example.fmt == "text":
        record = {"text": example.turns[0][1], "split": split}
    else:
        messages = [{"role": role, "content": content} for role, content in example.turns]
        record = {"messages": messages, "split": split}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def _report_bytes(redacted: bool, counts: Counter[str], sample: list[RedactionSample]) -> bytes:
    document = {
        "note": _REPORT_NOTE,
        "redacted": redacted,
        "person_names_redacted": redacted and person_detector_available(),
        "counts": dict(sorted(counts.items())),
        "sample": [{"line": s.line, "before": s.before, "after": s.after} for s in sample],
    }
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
