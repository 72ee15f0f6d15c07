"""Molecular fingerprints and similarity searches over them, numbers as RDKit's.

Molecules are read from SMILES, SDF or CSV files; a record RDKit cannot parse or sanitize is
reported (file, line or record number, RDKit's own message) and skipped, never dropped silently
and never fatal. Fingerprints come from RDKit's ``rdFingerprintGenerator`` and are kept packed,
``(N, n_bits/8)`` uint8 with RDKit's bit ``i`` at bit ``i % 8`` of byte ``i // 8`` (the layout of
``DataStructs.BitVectToBinaryText`` and the FPS format), with their popcounts.

Similarity is a ratio of integers: the bits two fingerprints share ``c`` and their popcounts ``a``
and ``b``. Tanimoto is ``c / (a + b - c)``, Dice ``2c / (a + b)``, each divided once in float64 as
RDKit divides (0 when the denominator is 0, which is what ``BulkTanimotoSimilarity`` and
``BulkDiceSimilarity`` return for two empty fingerprints), so every score is bit-identical to
RDKit's, whichever engine counts ``c`` (all count it exactly; docs/compounds.md compares them):

- ``popcount`` (:mod:`models.compounds._popcount`): AND + popcount on packed uint64 words, with the
  vector popcount where the CPU has one; fast on every CPU.
- ``gemm``: the shared-bit counts of a block of queries against a block of the library are one
  GEMM of their unpacked 0/1 matrices: bfloat16 (on CUDA, or a CPU with AMX / AVX-512 BF16) when
  no count can exceed 256 (every integer up to 256 is a bfloat16, so every partial sum is exact
  in any order), else int8 with int32 sums (``torch._int_mm``, on a CPU with AMX or VNNI), else
  float32, which holds every count up to 2²⁴ (:mod:`models.cpu_features` picks). ``cuda`` is
  the same on the GPU.
- ``auto`` (:func:`choose_engine`): CUDA where the device is CUDA; on the CPU ``popcount``
  unless the CPU has AMX, where a short timing probe (cached) decides.

Searches stream over the library in popcount order, skip what the Swamidass-Baldi bound
``min(a, b) / max(a, b)`` rules out (as FPSim2 does), and pick candidates by an integer cut on
the counts before the exact float64 check:

- :func:`top_k`: the ``k`` most similar library molecules per query; equal scores are ordered by
  library index, lower first.
- :func:`threshold_search`: every pair scoring ``>= threshold`` (FPSim2's ``coeff >= threshold``).
- :func:`top_k_all_pairs` / :func:`threshold_all_pairs`: the same within one set, self excluded.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypedDict, Unpack

import numba
import numpy as np
import torch
from rdkit import Chem, DataStructs, rdBase
from rdkit.Chem import rdFingerprintGenerator

from models import cpu_features
from models.compounds import _popcount as chem_popcount
from models.cpu_features import fast_bf16_gemm, fast_int8_gemm
from models.device import Device, resolve_device

Metric = Literal["tanimoto", "dice"]
FingerprintKind = Literal["morgan", "feature-morgan", "rdkit", "atom-pair", "torsion"]
METRICS: tuple[Metric, ...] = ("tanimoto", "dice")
FINGERPRINT_KINDS: tuple[FingerprintKind, ...] = (
    "morgan",
    "feature-morgan",
    "rdkit",
    "atom-pair",
    "torsion",
)

#: Library molecules per streamed block (unpacked once per query chunk: 8 MB of bfloat16 at
#: 2,048 bits). Sorted by popcount, a block of a drug-like library spans one to three popcounts,
#: which is what makes the bound and the count cut tight.
LIBRARY_BLOCK = 2048
#: Queries per GEMM, sorted by popcount; each tile is cut to the rows the bound lets through.
QUERY_BLOCK = 1024
#: Queries unpacked at once; the library is unpacked once per chunk.
QUERY_CHUNK = 32768
#: Up to this many rows, the running top-k merge sorts on one float64 key for row and score.
_ONE_KEY_ROWS = 4096
#: Tiles are cut to the query rows a library block can matter to: a power of two, at least this.
_ROW_QUANTUM = 64
#: The largest count a bfloat16 GEMM holds exactly: every integer up to 2⁸ is a bfloat16.
_BF16_EXACT_COUNT = 256
#: torch._int_mm on the CPU (torch 2.13) returns garbage for k = 1; see models/genome/api.py.
_INT_MM_MIN_K = 8
#: Relative slack on the integer count cut, far above float64 (and float32 seed) rounding, far
#: below the gap between two scores (≥ 1/n_bits²); the exact check removes what it lets in.
_CUT_SLACK = 1e-6
_NO_INDEX = np.iinfo(np.int64).max
_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ?", re.MULTILINE)
_POSITION = re.compile(r"check for mistakes around position (\d+)")
log = logging.getLogger(__name__)


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseFailure:
    """One record RDKit could not turn into a molecule."""

    source: str
    #: The line number (SMILES, CSV) or the 1-based record number (SDF).
    record: int
    #: The line the record starts on.
    line: int
    #: The SMILES, or the SDF record's title line.
    text: str
    #: RDKit's message, timestamps removed.
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.record == self.line else f"record {self.record}"
        return f"{self.source}, {where} ({self.text!r}): {self.reason}"


@dataclass(frozen=True)
class Molecules:
    """The molecules read from one file, with what could not be read."""

    mols: tuple[Chem.Mol, ...]
    ids: tuple[str, ...]
    #: Line (SMILES, CSV) or record (SDF) number of each molecule.
    records: tuple[int, ...]
    failures: tuple[ParseFailure, ...]

    def __len__(self) -> int:
        return len(self.mols)


def _reason(messages: str, fallback: str) -> str:
    """RDKit's messages as one line: a failure is one line of a report (the CLI's refusal, its
    "skipped:" lines). RDKit explains a SMILES syntax error in five lines (the error, "check for
    mistakes around position N:", the SMILES again, a caret under it, "Failed parsing SMILES
    …"): the first, with the position."""
    lines = [line.strip() for line in _TIMESTAMP.sub("", messages).splitlines() if line.strip()]
    if not lines:
        return fallback
    if found := _POSITION.search(messages):
        return f"{lines[0]} (around position {found.group(1)})"
    return "; ".join(lines)


def _from_smiles(smiles: str) -> tuple[Chem.Mol | None, str]:
    # CaptureErrorLog keeps RDKit's own reason (syntax position, valence, kekulization) instead of
    # letting it go to stderr; nested captures shadow outer ones (rdBase docs).
    with rdBase.CaptureErrorLog() as capture:
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, _reason(capture.messages, "RDKit returned no molecule")
    return mol, ""


def _open_text(path: Path) -> IO[str]:
    # UTF-8, with the bytes that are not kept as lone surrogates: a record holding one is
    # reported by its line (_not_utf8), instead of one byte refusing the whole file. A byte
    # order mark is dropped: Excel's "CSV UTF-8" starts with one, which made the first column
    # '\ufeffsmiles' and the whole file "no column 'smiles'".
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape")
    return path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")


def _not_utf8(text: str) -> str | None:
    """Why ``text`` (read by :func:`_open_text`) is not UTF-8, or None if it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00
        return f"not UTF-8 text: byte 0x{byte:02x} at character {exc.start + 1} of the record"
    return None


#: The longest molecule id kept: what ``compound_neighbours`` holds (``String(200)``).
MAX_ID_LENGTH = 200


def _bad_id(name: str) -> str | None:
    """Why ``name`` cannot name a molecule in a job's results, or None if it can."""
    if "\x00" in name:
        return "its id has a NUL byte"
    if len(name) > MAX_ID_LENGTH:
        return f"its id is longer than {MAX_ID_LENGTH} characters ({len(name)})"
    return None


#: The most heavy atoms a molecule may have: RDKit's atom-pair fingerprint takes 2 s at 1,000
#: and grows with the cube (16 s at 2,000; a 20,000-atom polymer held a submission for hours).
#: Proteins and polymers are not what 2-D fingerprints compare.
MAX_HEAVY_ATOMS = 1000


def _too_large(mol: Chem.Mol) -> str | None:
    """Why ``mol`` is too large to fingerprint, or None."""
    if (n := mol.GetNumHeavyAtoms()) > MAX_HEAVY_ATOMS:
        return f"{n} heavy atoms, more than {MAX_HEAVY_ATOMS}"
    return None


def _shown(text: str) -> str:
    """``text`` as a failure shows it: bytes that are not UTF-8 as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


#: What a reader makes of one record: the molecule with its id and line (or record) number, or
#: the reason it has none.
_Read = tuple[Chem.Mol, str, int] | ParseFailure


def _collect(records: Iterable[_Read], limit: int | None = None) -> Molecules:
    """The molecules and failures of the first ``limit`` records (all of them by default)."""
    mols: list[Chem.Mol] = []
    ids: list[str] = []
    numbers: list[int] = []
    failures: list[ParseFailure] = []
    for read in itertools.islice(records, limit):
        if isinstance(read, ParseFailure):
            failures.append(read)
            continue
        mol, name, number = read
        mols.append(mol)
        ids.append(name)
        numbers.append(number)
    return Molecules(tuple(mols), tuple(ids), tuple(numbers), tuple(failures))


def read_smiles(
    path: str | Path, *, title_line: bool = False, limit: int | None = None
) -> Molecules:
    """A SMILES file: one molecule a line, ``SMILES`` then an optional id after a space or tab.

    Blank lines and lines starting with ``#`` are skipped; a molecule without an id is named by
    its line number. ``.gz`` files are read as gzip. ``limit`` stops after that many records.
    """
    path = _check_file(path)
    with _open_text(path) as handle:
        return _collect(_smiles_lines(str(path), handle, title_line), limit)


def _smiles_lines(source: str, handle: IO[str], title_line: bool) -> Iterator[_Read]:
    for number, line in enumerate(handle, start=1):
        if title_line and number == 1:
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split(None, 1)
        smiles = fields[0]
        if bad := _not_utf8(text):
            yield ParseFailure(source, number, number, _shown(smiles), bad)
            continue
        mol, reason = _from_smiles(smiles)
        name = fields[1].strip() if len(fields) > 1 else str(number)
        if mol is not None and (bad := _bad_id(name) or _too_large(mol)):
            mol, reason, smiles = None, bad, smiles[:80]
        if mol is None:
            yield ParseFailure(source, number, number, smiles, reason)
        else:
            yield mol, name, number


#: The longest CSV field read (csv's own default): a longer one, or a quote left open, is its
#: record's failure. Set for each read, since csv's limit is process-wide and other libraries
#: raise it (importing scipy.io.arff sets it to the largest C long).
CSV_FIELD_LIMIT = 131_072


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_csv(
    path: str | Path,
    *,
    smiles_column: str = "smiles",
    id_column: str | None = None,
    delimiter: str = ",",
    limit: int | None = None,
) -> Molecules:
    """A delimited file with a header; SMILES from ``smiles_column``, ids from ``id_column``.

    Without ``id_column``, the ``id`` column names the molecules where the header has one, else
    a molecule is named by its line number (so is one whose id is empty). ``.gz`` files are read
    as gzip.
    """
    path = _check_file(path)
    with _open_text(path) as handle, _csv_field_limit(CSV_FIELD_LIMIT):
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise ValueError(f"{path}: the header line is not CSV: {exc}") from None
        for column in (smiles_column, id_column):
            if column is not None and column not in header:
                raise ValueError(f"{path}: no column {column!r}; the header has {header}")
        if id_column is None and "id" in header and smiles_column != "id":
            id_column = "id"
        return _collect(_csv_rows(str(path), reader, smiles_column, id_column), limit)


def _csv_rows(
    source: str, reader: csv.DictReader, smiles_column: str, id_column: str | None
) -> Iterator[_Read]:
    start = 2  # the header is line 1
    rows = iter(reader)
    while True:
        number = start
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # A field over csv's limit (a SMILES of more than 131,072 characters, or a quote
            # left open): that record's failure; the reader goes on after it.
            start = reader.line_num + 1
            yield ParseFailure(source, number, number, "", f"not CSV: {exc}")
            continue
        start = reader.line_num + 1
        smiles = (row.get(smiles_column) or "").strip()
        name = (row.get(id_column) or "").strip() if id_column is not None else ""
        if bad := _not_utf8(smiles + name):  # other columns are not read
            yield ParseFailure(source, number, number, _shown(smiles), bad)
            continue
        mol, reason = _from_smiles(smiles)
        name = name or str(number)
        if mol is not None and smiles and (bad := _bad_id(name) or _too_large(mol)):
            mol, reason, smiles = None, bad, smiles[:80]
        if mol is None or not smiles:
            yield ParseFailure(source, number, number, smiles, reason or "empty SMILES")
        else:
            yield mol, name, number


def _sdf_records(handle: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of each record, ``$$$$`` separators removed."""
    lines: list[str] = []
    first = 1
    for number, line in enumerate(handle, start=1):
        if line.rstrip("\r\n") == "$$$$":
            yield first, lines
            lines, first = [], number + 1
        else:
            lines.append(line)
    if any(line.strip() for line in lines):
        yield first, lines


def _sdf_properties(lines: list[str]) -> dict[str, str]:
    props: dict[str, str] = {}
    name: str | None = None
    values: list[str] = []
    for line in lines:
        text = line.rstrip("\r\n")
        if text.startswith(">"):
            found = re.search(r"<([^>]*)>", text)
            name, values = (found.group(1) if found else None), []
        elif name is not None:
            if text.strip():
                values.append(text)
            else:
                props[name] = "\n".join(values)
                name = None
    if name is not None:
        props[name] = "\n".join(values)
    return props


def read_sdf(
    path: str | Path, *, id_field: str | None = None, limit: int | None = None
) -> Molecules:
    """An SD file; each record sanitized and its hydrogens removed, as ``SDMolSupplier`` does.

    A molecule is named by its ``id_field`` data item when given (and present), else by its title
    line, else by its record number. ``.gz`` files are read as gzip.
    """
    path = _check_file(path)
    with _open_text(path) as handle:
        return _collect(_sdf_molecules(str(path), handle, id_field), limit)


def _sdf_molecules(source: str, handle: IO[str], id_field: str | None) -> Iterator[_Read]:
    for record, (line, lines) in enumerate(_sdf_records(handle), start=1):
        end = next((i for i, text in enumerate(lines) if text.startswith("M  END")), None)
        block = "".join(lines if end is None else lines[: end + 1])
        title = lines[0].strip() if lines else ""
        if bad := _not_utf8(block):
            yield ParseFailure(source, record, line, _shown(title), bad)
            continue
        with rdBase.CaptureErrorLog() as capture:
            mol = Chem.MolFromMolBlock(block) if end is not None else None
        if mol is None:
            fallback = "RDKit returned no molecule" if end is not None else "no 'M  END' line"
            yield ParseFailure(source, record, line, title, _reason(capture.messages, fallback))
            continue
        props = _sdf_properties(lines[end + 1 :]) if end is not None else {}
        name = props.get(id_field, "") if id_field is not None else ""
        if bad := _not_utf8(name):
            yield ParseFailure(source, record, line, _shown(title), f"{id_field}: {bad}")
            continue
        name = name or title or str(record)
        if bad := _bad_id(name) or _too_large(mol):
            yield ParseFailure(source, record, line, title[:80], bad)
            continue
        yield mol, name, record


# --- fingerprints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprints:
    """Packed bit fingerprints with their popcounts.

    ``bits`` is (N, ceil(n_bits / 8)) uint8, RDKit's bit ``i`` at bit ``i % 8`` of byte
    ``i // 8``; ``popcounts`` is (N,) int32.
    """

    bits: np.ndarray  # (N, n_bytes) uint8
    popcounts: np.ndarray  # (N,) int32
    n_bits: int
    ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits.ndim != 2 or self.bits.dtype != np.uint8:
            raise ValueError(
                f"bits: expected (N, n_bytes) uint8, got {self.bits.dtype} {self.bits.shape}"
            )
        if self.bits.shape[1] != (self.n_bits + 7) // 8:
            raise ValueError(
                f"bits: {self.bits.shape[1]} bytes a row, {self.n_bits} bits need {(self.n_bits + 7) // 8}"
            )
        if self.popcounts.shape != (self.bits.shape[0],):
            raise ValueError(
                f"popcounts: expected shape ({self.bits.shape[0]},), got {self.popcounts.shape}"
            )
        if self.ids and len(self.ids) != self.bits.shape[0]:
            raise ValueError(f"ids: {len(self.ids)} for {self.bits.shape[0]} fingerprints")

    def __len__(self) -> int:
        return int(self.bits.shape[0])

    @classmethod
    def from_bitvects(
        cls, bitvects: Sequence[DataStructs.ExplicitBitVect], *, ids: Sequence[str] = ()
    ) -> Fingerprints:
        """Pack RDKit ``ExplicitBitVect`` s (all of one length)."""
        if not bitvects:
            raise ValueError("no fingerprints")
        n_bits = bitvects[0].GetNumBits()
        if any(bv.GetNumBits() != n_bits for bv in bitvects):
            raise ValueError("fingerprints of different lengths")
        raw = b"".join(DataStructs.BitVectToBinaryText(bv) for bv in bitvects)
        bits = np.frombuffer(raw, dtype=np.uint8).reshape(len(bitvects), (n_bits + 7) // 8)
        return cls.from_packed(bits.copy(), n_bits, ids=ids)

    @classmethod
    def from_packed(cls, bits: np.ndarray, n_bits: int, *, ids: Sequence[str] = ()) -> Fingerprints:
        """From (N, ceil(n_bits / 8)) uint8 in RDKit's byte and bit order; popcounts computed."""
        bits = np.ascontiguousarray(bits, dtype=np.uint8)
        popcounts = np.bitwise_count(bits).sum(axis=1, dtype=np.int32)
        return cls(bits, popcounts, n_bits, tuple(ids))

    def to_bitvects(self) -> list[DataStructs.ExplicitBitVect]:
        """RDKit ``ExplicitBitVect`` s with the same bits (for RDKit's own functions)."""
        out = []
        for row in self.bits:
            bv = DataStructs.ExplicitBitVect(self.n_bits)
            bv.SetBitsFromList(np.flatnonzero(np.unpackbits(row, bitorder="little")).tolist())
            out.append(bv)
        return out

    def take(self, rows: Sequence[int] | np.ndarray) -> Fingerprints:
        """The fingerprints at ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.intp)
        ids = tuple(self.ids[r] for r in rows) if self.ids else ()
        return Fingerprints(self.bits[rows], self.popcounts[rows], self.n_bits, ids)


def fingerprint_generator(
    kind: FingerprintKind = "morgan", *, radius: int = 2, fp_size: int = 2048
) -> rdFingerprintGenerator.FingerprintGenerator64:
    """The RDKit generator behind :func:`fingerprints` (``radius`` is for the Morgan kinds)."""
    if fp_size < 1:
        raise ValueError(f"fp_size must be ≥ 1, got {fp_size}")
    if kind == "morgan":
        return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=fp_size)
    if kind == "feature-morgan":
        features = rdFingerprintGenerator.GetMorganFeatureAtomInvGen()
        return rdFingerprintGenerator.GetMorganGenerator(
            radius=radius, fpSize=fp_size, atomInvariantsGenerator=features
        )
    if kind == "rdkit":
        return rdFingerprintGenerator.GetRDKitFPGenerator(fpSize=fp_size)
    if kind == "atom-pair":
        return rdFingerprintGenerator.GetAtomPairGenerator(fpSize=fp_size)
    if kind == "torsion":
        return rdFingerprintGenerator.GetTopologicalTorsionGenerator(fpSize=fp_size)
    raise ValueError(f"kind must be one of {FINGERPRINT_KINDS}, got {kind!r}")


def fingerprints(
    mols: Molecules | Sequence[Chem.Mol],
    *,
    kind: FingerprintKind = "morgan",
    radius: int = 2,
    fp_size: int = 2048,
) -> Fingerprints:
    """Bit fingerprints of molecules, packed (ids carried over from :class:`Molecules`).

    Parameters
    ----------
    mols
        What a reader returned, or RDKit molecules.
    kind
        ``"morgan"`` (ECFP-like), ``"feature-morgan"`` (FCFP-like), ``"rdkit"`` (RDKit's
        topological paths), ``"atom-pair"`` or ``"torsion"``; RDKit's generator defaults otherwise.
    radius
        Morgan radius (2 is ECFP4).
    fp_size
        Bits per fingerprint.

    Returns
    -------
    Fingerprints
        ``bits`` (N, ceil(fp_size / 8)) uint8 and ``popcounts`` (N,) int32.
    """
    generator = fingerprint_generator(kind, radius=radius, fp_size=fp_size)
    ids: Sequence[str] = mols.ids if isinstance(mols, Molecules) else ()
    items = list(mols.mols if isinstance(mols, Molecules) else mols)
    if not items:
        return Fingerprints(
            np.zeros((0, (fp_size + 7) // 8), np.uint8), np.zeros(0, np.int32), fp_size
        )
    return Fingerprints.from_bitvects(generator.GetFingerprints(items, numThreads=1), ids=ids)


# --- kernels ----------------------------------------------------------------------------------


def _scores(c: np.ndarray, a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """RDKit's division: Tanimoto ``c / (a + b - c)``, Dice ``2c / (a + b)``, float64, 0 for 0/0."""
    c = np.asarray(c, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "tanimoto":
        num, den = c, a + b - c
    else:
        num, den = 2.0 * c, a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den == 0.0, 0.0, out)


def _bound(a: np.ndarray, b_min: int, b_max: int, metric: Metric) -> np.ndarray:
    """The highest score a query of popcount ``a`` can reach in a block of popcounts [min, max].

    ``c <= min(a, b)`` (Swamidass & Baldi 2007); the bound peaks at the ``b`` closest to ``a``.
    """
    b = np.clip(a, b_min, b_max)
    return _scores(np.minimum(a, b), a, b, metric)


def _key(score: np.ndarray, metric: Metric) -> np.ndarray:
    """``c / (a + b)`` for a score: Tanimoto ``t / (1 + t)``, Dice ``d / 2``; increasing in it."""
    if metric == "dice":
        return score / 2.0
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(score), -np.inf, score / (1.0 + score))


def _count_cut(key: np.ndarray, a: np.ndarray, b_min: int) -> np.ndarray:
    """The smallest count that can reach ``key`` against any ``b >= b_min``, a little under it.

    score ≥ s  ⟺  c / (a + b) ≥ key(s)  ⟹  c ≥ key(s)·(a + b_min).
    """
    cut = np.ceil(np.where(key > 0.0, key, 0.0) * (a + b_min) * (1.0 - _CUT_SLACK))
    return np.maximum(cut, 0.0)


def _check_pair(query: Fingerprints, library: Fingerprints, metric: Metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if query.n_bits != library.n_bits:
        raise ValueError(f"query has {query.n_bits}-bit fingerprints, library {library.n_bits}-bit")


class _Gemm:
    """Unpacks 0/1 bits for one GEMM dtype and multiplies them into exact shared-bit counts.

    ``dtype`` forces one (``"bf16"`` only where every count is exact in it); by default bfloat16
    where exact and fast, else int8 where fast, else float32.
    """

    def __init__(
        self,
        query: Fingerprints,
        library: Fingerprints,
        device: torch.device,
        dtype: GemmDtype | None = None,
    ) -> None:
        self.device = device
        most = min(_max(query.popcounts), _max(library.popcounts))
        on_cpu = device.type == "cpu"
        int8_ok = on_cpu and query.bits.shape[1] * 8 >= _INT_MM_MIN_K
        if dtype == "bf16" and most > _BF16_EXACT_COUNT:
            raise ValueError(
                f"the bfloat16 GEMM is exact for counts up to {_BF16_EXACT_COUNT}; "
                f"these fingerprints share up to {most} bits"
            )
        if dtype == "int8" and not int8_ok:
            raise ValueError("the int8 GEMM runs on the CPU, for fingerprints of 8 bits or more")
        if dtype == "bf16" or (
            dtype is None and most <= _BF16_EXACT_COUNT and (not on_cpu or fast_bf16_gemm())
        ):
            self.dtype = torch.bfloat16
        elif dtype == "int8" or (dtype is None and int8_ok and fast_int8_gemm()):
            self.dtype = torch.int8  # int32 sums: exact below 2³¹ bits
        else:
            if query.n_bits > 2**24:
                raise ValueError(f"{query.n_bits}-bit fingerprints: counts would not be exact")
            self.dtype = torch.float32  # exact to 2²⁴

    def unpack(self, bits: np.ndarray) -> torch.Tensor:
        ones = torch.from_numpy(np.unpackbits(bits, axis=1, bitorder="little")).to(self.device)
        return ones.view(torch.int8) if self.dtype == torch.int8 else ones.to(self.dtype)

    def counts(self, q: torch.Tensor, lib: torch.Tensor) -> torch.Tensor:
        """(n_q, n_lib) shared-bit counts: int32, or bfloat16/float32 holding integers."""
        if self.dtype == torch.int8:
            return torch._int_mm(q, lib.T)
        return q @ lib.T


def _max(x: np.ndarray) -> int:
    return int(x.max()) if x.size else 0


@dataclass
class _Block:
    """A run of popcount-sorted fingerprints: original indices and popcounts."""

    start: int  # position in the sorted order
    rows: np.ndarray  # (n,) original indices
    pop: np.ndarray  # (n,) int64 popcounts, ascending

    @property
    def lo(self) -> int:
        return int(self.pop[0])

    @property
    def hi(self) -> int:
        return int(self.pop[-1])


def _blocks(order: np.ndarray, pop: np.ndarray, start: int, stop: int, size: int) -> list[_Block]:
    return [
        _Block(s, order[s : min(s + size, stop)], pop[order[s : min(s + size, stop)]])
        for s in range(start, stop, size)
    ]


Tile = tuple[_Block, _Block, torch.Tensor]


def _tiles(
    query: Fingerprints,
    library: Fingerprints,
    *,
    same: bool,
    gemm: _Gemm,
    reach: Callable[[_Block, _Block], np.ndarray],
    library_block: int,
    query_block: int,
) -> Iterator[Tile]:
    """(query block, library block, counts) over both sets in popcount order.

    ``reach`` says which rows of a query block the library block can still matter to; the tile is
    cut to the rows from the first to the last of them (popcount-sorted rows: one run, as the
    bound falls away on both sides of the block's popcounts), or skipped when there are none.

    With ``same`` (one set against itself) the query and library orders are one order, and each
    molecule's count with itself is set to -1, below every count cut.
    """
    if same and len(query) <= QUERY_CHUNK:
        yield from _symmetric_tiles(query, gemm=gemm, reach=reach, block=library_block)
        return
    q_pop = query.popcounts.astype(np.int64)
    l_pop = library.popcounts.astype(np.int64)
    q_order = np.argsort(q_pop, kind="stable")
    l_order = q_order if same else np.argsort(l_pop, kind="stable")
    for chunk in range(0, len(query), QUERY_CHUNK):
        stop = min(chunk + QUERY_CHUNK, len(query))
        q_blocks = _blocks(q_order, q_pop, chunk, stop, query_block)
        q_bits = gemm.unpack(query.bits[q_order[chunk:stop]])
        l_blocks = _blocks(l_order, l_pop, 0, len(library), library_block)
        # Library blocks nearest the queries' median popcount first: top-k cuts rise fastest.
        middle = float(np.median(q_pop[q_order[chunk:stop]]))
        l_blocks.sort(key=lambda b: abs(float(np.median(b.pop)) - middle))
        for lb in l_blocks:
            l_bits: torch.Tensor | None = None
            for whole in q_blocks:
                live = np.flatnonzero(reach(whole, lb))
                if live.size == 0:
                    continue
                # Power-of-two row counts from _ROW_QUANTUM: oneDNN builds a kernel per GEMM shape
                # (milliseconds each), so few shapes.
                span = max(_ROW_QUANTUM, 1 << (int(live[-1]) - int(live[0])).bit_length())
                last = min(int(live[0]) + span, len(whole.rows))
                first = max(last - span, 0)
                qb = _Block(whole.start + first, whole.rows[first:last], whole.pop[first:last])
                if l_bits is None:
                    l_bits = gemm.unpack(library.bits[lb.rows])
                q0 = qb.start - chunk
                counts = gemm.counts(q_bits[q0 : q0 + len(qb.rows)], l_bits)
                if same:
                    first, last = (
                        max(qb.start, lb.start),
                        min(qb.start + len(qb.rows), lb.start + len(lb.rows)),
                    )
                    if first < last:
                        diag = torch.arange(first, last, device=counts.device)
                        counts[diag - qb.start, diag - lb.start] = -1
                yield qb, lb, counts


def _symmetric_tiles(
    fps: Fingerprints,
    *,
    gemm: _Gemm,
    reach: Callable[[_Block, _Block], np.ndarray],
    block: int,
) -> Iterator[Tile]:
    """One set against itself: each product of two blocks is computed once and yielded twice,
    as (i, j, C) and (j, i, Cᵀ); about half the GEMM work of :func:`_tiles`. Blocks of nearby
    popcounts first (the diagonal band outwards), so top-k cuts rise fastest."""
    pop = fps.popcounts.astype(np.int64)
    order = np.argsort(pop, kind="stable")
    blocks = _blocks(order, pop, 0, len(fps), block)
    bits = gemm.unpack(fps.bits[order])
    pairs = sorted(
        ((i, j) for i in range(len(blocks)) for j in range(i, len(blocks))),
        key=lambda ij: (ij[1] - ij[0], ij[0]),
    )
    for i, j in pairs:
        bi, bj = blocks[i], blocks[j]
        forward, backward = reach(bi, bj).any(), i != j and reach(bj, bi).any()
        if not (forward or backward):
            continue
        counts = gemm.counts(
            bits[bi.start : bi.start + len(bi.rows)], bits[bj.start : bj.start + len(bj.rows)]
        )
        if i == j:
            diag = torch.arange(len(bi.rows), device=counts.device)
            counts[diag, diag] = -1
        if forward:
            yield bi, bj, counts
        if backward:
            yield bj, bi, counts.T


def _candidates(counts: torch.Tensor, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, count) of the entries at or above each row's count cut."""
    # Cuts are integers; in bfloat16 those up to 256 are exact and no count exceeds 256 there.
    cut_t = torch.from_numpy(cut).to(counts.device).to(counts.dtype)
    if counts.T.is_contiguous() and not counts.is_contiguous():  # a Cᵀ from _symmetric_tiles
        forward = counts.T
        cols, rows = torch.nonzero(forward >= cut_t.view(1, -1), as_tuple=True)
    else:
        rows, cols = torch.nonzero(counts >= cut_t[:, None], as_tuple=True)
    values = counts[rows, cols].to(torch.int64)
    return rows.cpu().numpy(), cols.cpu().numpy(), values.cpu().numpy()


# --- engines ----------------------------------------------------------------------------------

#: What ``MEDBATCH_CHEM_ENGINE`` may say: ``gemm`` is the GEMM of 0/1 bits on the CPU (bfloat16 on
#: AMX where exact, else int8 ``_int_mm``), ``cuda`` the same GEMM on the GPU, ``popcount`` the
#: AND + popcount kernels of :mod:`models.compounds._popcount`, ``auto`` chooses.
EngineSetting = Literal["auto", "gemm", "popcount", "cuda"]
#: What the search functions accept: a setting, or the CPU GEMM with its dtype forced.
Engine = Literal["auto", "gemm", "gemm-bf16", "gemm-int8", "popcount", "cuda"]
ENGINE_SETTINGS: tuple[EngineSetting, ...] = ("auto", "gemm", "popcount", "cuda")
ENGINES: tuple[Engine, ...] = ("auto", "gemm", "gemm-bf16", "gemm-int8", "popcount", "cuda")
GemmDtype = Literal["bf16", "int8"]
#: The probe: top-10 of 128 queries in 8,192 molecules, 2,048-bit fingerprints of ~48 bits in
#: families of 16 that share most of them (as analogues do: top-10 scores near 0.5).
_PROBE_SHAPE = (128, 8192, 48)
_PROBE_BUDGET_S = 0.2
_CHOICES: dict[str, EngineChoice] = {}
_CHOICE_LOCK = threading.Lock()


@dataclass(frozen=True)
class EngineChoice:
    """The engine ``auto`` runs on this machine's CPU, and why."""

    engine: Literal["gemm", "popcount"]
    #: How it was chosen, in words.
    reason: str
    #: Seconds each engine took on the probe (empty where the CPU's features decided).
    probe: dict[str, float]
    cpu: str
    flags: tuple[str, ...]

    def describe(self) -> str:
        times = ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in self.probe.items())
        return (
            f"compound similarity engine: {self.engine} ({self.reason}{'; probe: ' + times if times else ''}); "
            f"CPU {self.cpu}, flags {' '.join(self.flags) or 'none of ' + ' '.join(cpu_features.ENGINE_FLAGS)}"
        )


def _probe_key() -> str:
    return json.dumps(
        {
            "cpu": cpu_features.cpu_model(),
            "flags": cpu_features.engine_flags(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(),
        },
        sort_keys=True,
    )


def _probe_fingerprints() -> tuple[Fingerprints, Fingerprints]:
    n_q, n_lib, on = _PROBE_SHAPE
    n, family = n_q + n_lib, 16
    rng = np.random.default_rng(20)
    centres = rng.integers(0, 2048, size=(n // family + 1, on))
    cols = centres[rng.permutation(n) // family]
    moved = rng.integers(0, on, size=(n, on // 6))
    cols[np.arange(n)[:, None], moved] = rng.integers(0, 2048, size=moved.shape)
    ones = np.zeros((n, 2048), dtype=np.uint8)
    np.put_along_axis(ones, cols, 1, axis=1)
    fps = Fingerprints.from_packed(np.packbits(ones, axis=1, bitorder="little"), 2048)
    return fps.take(range(n_q)), fps.take(range(n_q, n))


def _probe() -> dict[str, float]:
    """Seconds per CPU engine on the probe's search: after a warm-up, the best of three runs, or
    of fewer where they add up to more than :data:`_PROBE_BUDGET_S`."""
    query, library = _probe_fingerprints()
    times: dict[str, float] = {}
    for engine in ("popcount", "gemm"):
        top_k(query, library, 10, engine=engine)
        runs: list[float] = []
        while len(runs) < 3 and sum(runs) < _PROBE_BUDGET_S:
            start = time.perf_counter()
            top_k(query, library, 10, engine=engine)
            runs.append(time.perf_counter() - start)
        times[engine] = min(runs)
    return times


def choose_engine(cache: Path | None = None) -> EngineChoice:
    """The CPU engine ``auto`` runs here, chosen once per process (and logged once).

    From the CPU's flags where they settle it: without AMX, a GEMM of 0/1 bits spends a
    multiply-add per bit while the popcount engine counts 64 (or 512, with AVX-512 VPOPCNTDQ) per
    instruction, so ``popcount``. With AMX (or AVX-512 BF16 without the vector popcount), a short
    probe times both (a fraction of a second); ``cache`` names a JSON file that keeps its verdict
    for this CPU, these library versions and thread counts, so the next process reads it instead.
    """
    key = _probe_key()
    with _CHOICE_LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        flags = cpu_features.cpu_flags()
        gemm_units = cpu_features.has_amx() or (
            "avx512_bf16" in flags and "avx512_vpopcntdq" not in flags
        )
        probe: dict[str, float] = {}
        if not gemm_units:
            engine: Literal["gemm", "popcount"] = "popcount"
            reason = "no AMX on this CPU: a GEMM of 0/1 bits would do a multiply-add per bit"
        else:
            cached = _read_probe(cache, key)
            probe, reason = (cached, f"probe cached in {cache}") if cached else (_probe(), "probe")
            engine = "popcount" if probe["popcount"] <= probe["gemm"] else "gemm"
            if not cached:
                _write_probe(cache, key, probe)
        choice = EngineChoice(
            engine, reason, probe, cpu_features.cpu_model(), tuple(cpu_features.engine_flags())
        )
        log.info("%s", choice.describe())
        _CHOICES[key] = choice
        return choice


def _read_probe(cache: Path | None, key: str) -> dict[str, float] | None:
    if cache is None:
        return None
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return {name: float(saved["probe"][name]) for name in ("popcount", "gemm")}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # no cache, or another machine's: probe again
    return None


def _write_probe(cache: Path | None, key: str, probe: dict[str, float]) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_name(f"{cache.name}.{os.getpid()}.part")
        part.write_text(json.dumps({"key": key, "probe": probe}))
        part.replace(cache)
    except OSError as exc:  # a read-only folder costs a probe per process, nothing else
        log.debug("chem engine probe not cached in %s: %s", cache, exc)


_LAYOUTS: dict[int, tuple[weakref.ref[np.ndarray], chem_popcount.Library]] = {}
_LAYOUTS_KEPT = 2
_LAYOUT_LOCK = threading.Lock()


def _layout(library: Fingerprints) -> chem_popcount.Library:
    """The popcount engine's layout of a library, kept for the last few libraries searched (a
    worker runs every tile of a job against the same library)."""
    key = id(library.bits)
    with _LAYOUT_LOCK:
        kept = _LAYOUTS.get(key)
        if kept is not None and kept[0]() is library.bits:
            return kept[1]
    layout = chem_popcount.Library.build(library.bits, library.popcounts, library.n_bits)
    with _LAYOUT_LOCK:
        while len(_LAYOUTS) >= _LAYOUTS_KEPT:
            del _LAYOUTS[next(iter(_LAYOUTS))]
        _LAYOUTS[key] = (weakref.ref(library.bits), layout)
    return layout


@dataclass(frozen=True)
class _Plan:
    """How one search runs: ``popcount``, or the GEMM on ``device`` with ``dtype`` (None: by rule)."""

    kind: Literal["gemm", "popcount"]
    device: torch.device
    dtype: GemmDtype | None = None


def _plan(engine: Engine, device: Device, cache: Path | None = None) -> _Plan:
    cpu = torch.device("cpu")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "popcount":
        return _Plan("popcount", cpu)
    if engine == "gemm":
        return _Plan("gemm", cpu)
    if engine in ("gemm-bf16", "gemm-int8"):
        return _Plan("gemm", cpu, "bf16" if engine == "gemm-bf16" else "int8")
    if engine == "cuda":
        if not torch.cuda.is_available():  # a setting that cannot work here: no retry helps
            raise ValueError("MEDBATCH_CHEM_ENGINE=cuda but torch sees no CUDA device")
        return _Plan("gemm", torch.device("cuda"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        return _Plan("gemm", dev)
    return _Plan(choose_engine(cache).engine, cpu)


def resolve_engine(
    engine: Engine = "auto", *, device: Device = "auto", cache: Path | None = None
) -> Engine:
    """The engine a setting comes to here: ``popcount``, ``gemm`` (or a forced dtype) or
    ``cuda``. ``auto`` runs :func:`choose_engine` (with ``cache``) unless ``device`` gives CUDA;
    ``cuda`` without a GPU is refused."""
    plan = _plan(engine, device, cache)
    if plan.device.type == "cuda":
        return "cuda"
    if plan.kind == "popcount":
        return "popcount"
    return "gemm" if plan.dtype is None else f"gemm-{plan.dtype}"  # type: ignore[return-value]


def engine_name(
    query: Fingerprints, library: Fingerprints, *, engine: Engine = "auto", device: Device = "auto"
) -> str:
    """What a search of ``query`` against ``library`` runs on: ``popcount``, or ``gemm-bf16`` /
    ``gemm-int8`` / ``gemm-float32`` (CPU), ``cuda-bf16`` / ``cuda-float32``."""
    plan = _plan(engine, device)
    if plan.kind == "popcount":
        return "popcount"
    dtype = _Gemm(query, library, plan.device, plan.dtype).dtype
    where = "cuda" if plan.device.type == "cuda" else "gemm"
    return f"{where}-{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')}"


# --- public API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbours:
    """The ``k`` best library molecules per query, best first, ties by lower library index.

    ``index`` (N_q, k) int64 library rows, -1 where the library has fewer than ``k``
    (self excluded); ``score`` (N_q, k) float64, NaN there.
    """

    index: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class Hits:
    """Every (query, library) pair at or above a threshold, ordered by query, then score
    (highest first), then library index. Each is (H,): int64, int64, float64."""

    query: np.ndarray
    library: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return int(self.query.shape[0])


def similarity(
    query: Fingerprints,
    library: Fingerprints,
    *,
    metric: Metric = "tanimoto",
    device: Device = "auto",
    engine: Engine = "auto",
    library_block: int = LIBRARY_BLOCK,
) -> np.ndarray:
    """The full (N_q, N_lib) float64 similarity matrix, as ``DataStructs.Bulk*Similarity``.

    Only for sets whose matrix fits in memory; :func:`top_k` and :func:`threshold_search` stream.
    """
    _check_pair(query, library, metric)
    plan = _plan(engine, device)
    if plan.kind == "popcount":
        return chem_popcount.similarity(
            query.bits, query.popcounts, library.bits, library.popcounts, dice=metric == "dice"
        )
    out = np.empty((len(query), len(library)), dtype=np.float64)
    if out.size == 0:
        return out
    gemm = _Gemm(query, library, plan.device, plan.dtype)
    a = query.popcounts.astype(np.int64)
    b = library.popcounts.astype(np.int64)
    with torch.inference_mode():
        for q0 in range(0, len(query), QUERY_CHUNK):
            q1 = min(q0 + QUERY_CHUNK, len(query))
            q_bits = gemm.unpack(query.bits[q0:q1])
            for l0 in range(0, len(library), library_block):
                l1 = min(l0 + library_block, len(library))
                counts = gemm.counts(q_bits, gemm.unpack(library.bits[l0:l1]))
                c = counts.to(torch.int64).cpu().numpy()
                out[q0:q1, l0:l1] = _scores(c, a[q0:q1, None], b[None, l0:l1], metric)
    return out


def _top_k(query: Fingerprints, library: Fingerprints, k: int, search: _Search) -> Neighbours:
    metric = search.metric
    _check_pair(query, library, metric)
    if query.n_bits > 2**16:
        raise ValueError(f"{query.n_bits}-bit fingerprints: at most 65,536 bits")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    plan = _plan(search.engine, search.device)
    if plan.kind == "popcount":
        queries = chem_popcount.Queries.build(query.bits, query.popcounts)
        best, best_index = chem_popcount.top_k(
            queries, _layout(library), k, same=search.same, dice=metric == "dice"
        )
        empty = np.isneginf(best)
        return Neighbours(np.where(empty, -1, best_index), np.where(empty, np.nan, best))
    n_q = len(query)
    best = np.full((n_q, k), -np.inf)
    best_index = np.full((n_q, k), _NO_INDEX, dtype=np.int64)
    if n_q and len(library):

        def reach(qb: _Block, lb: _Block) -> np.ndarray:
            # Rows where a molecule of the block could at least tie the k-th best: an equal score
            # at a lower library index would displace it.
            return _bound(qb.pop, lb.lo, lb.hi, metric) >= best[qb.rows, k - 1]

        with torch.inference_mode():
            for qb, lb, counts in search.tiles(query, library, plan, reach):
                key = _key(best[qb.rows, k - 1], metric)
                seed = np.isneginf(key)
                if seed.any():
                    key = np.where(seed, _seed_key(counts, qb, lb, seed, k), key)
                cut = _count_cut(key, qb.pop, lb.lo)
                rows, cols, c = _candidates(counts, cut)
                if rows.size:
                    scores = _scores(c, qb.pop[rows], lb.pop[cols], metric)
                    _merge(best, best_index, qb.rows, rows, lb.rows[cols], scores)
    empty = np.isneginf(best)
    return Neighbours(np.where(empty, -1, best_index), np.where(empty, np.nan, best))


def _seed_key(counts: torch.Tensor, qb: _Block, lb: _Block, seed: np.ndarray, k: int) -> np.ndarray:
    """Each seeded row's k-th best ``c / (a + b)`` in this tile (float32): a lower bound on its
    final k-th best. -inf where the tile holds fewer than ``k`` molecules (self excluded)."""
    out = np.full(len(qb.rows), -np.inf)
    if counts.shape[1] < k:
        return out
    rows = torch.from_numpy(np.flatnonzero(seed)).to(counts.device)
    a = torch.from_numpy(qb.pop).to(counts.device)[rows]
    b = torch.from_numpy(lb.pop).to(counts.device)
    den = (a[:, None] + b[None, :]).clamp_(min=1).to(torch.float32)
    key = counts[rows].to(torch.float32).div_(den)
    kth = torch.topk(key, k, dim=1).values[:, -1].to(torch.float64).cpu().numpy()
    # A self pair (count -1) among a row's k best means the tile has fewer than k others.
    # float32 rounding of the key is relative 2⁻²⁴, inside _CUT_SLACK.
    out[seed] = np.where(kth < 0.0, -np.inf, kth)
    return out


def _merge(
    best: np.ndarray,
    best_index: np.ndarray,
    block_rows: np.ndarray,
    rows: np.ndarray,
    index: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Fold candidates (block row, library index, score) into the running k best per query."""
    k = best.shape[1]
    # Only candidates that beat a row's k-th best (or tie it from a lower index) change anything.
    kth, kth_index = best[block_rows[rows], k - 1], best_index[block_rows[rows], k - 1]
    better = (scores > kth) | ((scores == kth) & (index < kth_index))
    if not better.all():
        rows, index, scores = rows[better], index[better], scores[better]
        if rows.size == 0:
            return
    touched, local = np.unique(rows, return_inverse=True)
    target = block_rows[touched]
    m = touched.size
    all_rows = np.concatenate([np.repeat(np.arange(m), k), local])
    all_scores = np.concatenate([best[target].ravel(), scores])
    all_index = np.concatenate([best_index[target].ravel(), index])
    if m <= _ONE_KEY_ROWS:
        # Row, then score downwards, in one float64 key: scores lie in [0, 1] (-inf, empty, as
        # -1) and distinct ones differ by at least 1/(4·n_bits²), above the key's resolution
        # (2⁻³⁸ for 4,096 rows) for fingerprints up to 65,536 bits.
        order = np.lexsort((all_index, all_rows * 4.0 - np.maximum(all_scores, -1.0)))
    else:
        order = np.lexsort((all_index, -all_scores, all_rows))
    sorted_rows = all_rows[order]
    first = np.searchsorted(sorted_rows, np.arange(m))
    keep = order[np.arange(order.size) - first[sorted_rows] < k]
    best[target] = all_scores[keep].reshape(m, k)
    best_index[target] = all_index[keep].reshape(m, k)


def _threshold(
    query: Fingerprints, library: Fingerprints, threshold: float, search: _Search
) -> Hits:
    metric = search.metric
    _check_pair(query, library, metric)
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold}")
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    plan = _plan(search.engine, search.device)
    if plan.kind == "popcount":
        queries = chem_popcount.Queries.build(query.bits, query.popcounts)
        found.append(
            chem_popcount.threshold(
                queries, _layout(library), t, same=search.same, dice=metric == "dice"
            )
        )
    elif len(query) and len(library):

        def reach(qb: _Block, lb: _Block) -> np.ndarray:
            return _bound(qb.pop, lb.lo, lb.hi, metric) >= t

        key = float(_key(np.array(max(t, 0.0)), metric))
        with torch.inference_mode():
            for qb, lb, counts in search.tiles(query, library, plan, reach):
                cut = _count_cut(np.full(len(qb.rows), key), qb.pop, lb.lo)
                rows, cols, c = _candidates(counts, cut)
                scores = _scores(c, qb.pop[rows], lb.pop[cols], metric)
                hit = scores >= t
                found.append((qb.rows[rows[hit]], lb.rows[cols[hit]], scores[hit]))
    if not found:
        return Hits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    q, lib, s = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((lib, -s, q))
    return Hits(q[order].astype(np.int64), lib[order].astype(np.int64), s[order])


class SearchOptions(TypedDict, total=False):
    """How a search runs; every public search takes these as keywords (defaults in brackets)."""

    #: ``tanimoto`` or ``dice`` [tanimoto].
    metric: Metric
    #: ``auto``, ``cpu`` or ``cuda`` [auto: CUDA when present].
    device: Device
    #: ``MEDBATCH_CHEM_ENGINE`` [auto].
    engine: Engine
    #: Library rows a block, query rows a block [LIBRARY_BLOCK, QUERY_BLOCK].
    library_block: int
    query_block: int


@dataclass(frozen=True)
class _Search:
    """A search's :class:`SearchOptions` with their defaults, and whether it runs a set against
    itself (``same``: no self pairs)."""

    same: bool
    metric: Metric = "tanimoto"
    device: Device = "auto"
    engine: Engine = "auto"
    library_block: int = LIBRARY_BLOCK
    query_block: int = QUERY_BLOCK

    def tiles(
        self,
        query: Fingerprints,
        library: Fingerprints,
        plan: _Plan,
        reach: Callable[[_Block, _Block], np.ndarray],
    ) -> Iterator[Tile]:
        """:func:`_tiles` of the GEMM engine ``plan`` names."""
        return _tiles(
            query,
            library,
            same=self.same,
            gemm=_Gemm(query, library, plan.device, plan.dtype),
            reach=reach,
            library_block=self.library_block,
            query_block=self.query_block,
        )


def top_k(
    query: Fingerprints,
    library: Fingerprints,
    k: int = 10,
    **options: Unpack[SearchOptions],
) -> Neighbours:
    """The ``k`` most similar library molecules for every query.

    Parameters
    ----------
    query
        (N_q) fingerprints.
    library
        (N_lib) fingerprints of the same length.
    k
        Neighbours per query.
    metric
        ``"tanimoto"`` or ``"dice"``, scores bit-identical to RDKit's ``Bulk*Similarity``.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present): where ``engine="auto"`` runs.
    engine
        ``"auto"`` (CUDA where ``device`` resolves to it, else :func:`choose_engine`'s CPU
        engine), ``"gemm"``, ``"popcount"``, ``"cuda"``, or ``"gemm-bf16"`` / ``"gemm-int8"``
        (the CPU GEMM in that dtype). Every engine gives the same result.
    library_block, query_block
        The GEMM engines' streaming sizes; the result does not depend on them.

    Returns
    -------
    Neighbours
        ``index`` and ``score``, (N_q, k): best first, equal scores by lower library index.
    """
    return _top_k(query, library, k, _Search(same=False, **options))


def top_k_all_pairs(
    fps: Fingerprints,
    k: int = 10,
    **options: Unpack[SearchOptions],
) -> Neighbours:
    """:func:`top_k` of a set against itself, each molecule's own row excluded (duplicates kept)."""
    return _top_k(fps, fps, k, _Search(same=True, **options))


def threshold_search(
    query: Fingerprints,
    library: Fingerprints,
    threshold: float,
    **options: Unpack[SearchOptions],
) -> Hits:
    """Every (query, library) pair whose score is ``>= threshold``.

    Scores are RDKit's float64 values and the comparison is on them (FPSim2 compares
    ``coeff >= threshold`` on float32 coefficients; both agree away from a float32 rounding of
    the threshold itself). Parameters as in :func:`top_k`.

    Returns
    -------
    Hits
        (H,) query rows, library rows and scores, by query, score (highest first), library row.
    """
    return _threshold(query, library, threshold, _Search(same=False, **options))


def threshold_all_pairs(
    fps: Fingerprints,
    threshold: float,
    **options: Unpack[SearchOptions],
) -> Hits:
    """:func:`threshold_search` of a set against itself without self pairs (both (i, j) and (j, i))."""
    return _threshold(fps, fps, threshold, _Search(same=True, **options))


def as_molecules(smiles: Iterable[str]) -> Molecules:
    """Parse SMILES strings (ids are their 1-based positions), failures reported as by readers."""

    def parse(number: int, text: str) -> _Read:
        mol, reason = _from_smiles(text)
        if mol is None:
            return ParseFailure("<smiles>", number, number, text, reason)
        return mol, str(number), number

    return _collect(parse(number, text) for number, text in enumerate(smiles, start=1))
