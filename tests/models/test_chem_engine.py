"""Which engine compound similarity runs, and what machine code its popcount kernels become."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
import pydantic
import pytest
import torch

from medbatch.settings import Settings
from models import cpu_features
from models.compounds import _popcount as chem_popcount
from models.compounds import chem

#: An AMD EPYC Zen 4 as /proc/cpuinfo lists it (the part that matters): AVX-512 with the vector
#: popcount, BF16 and VNNI, no AMX.
ZEN4 = frozenset({"avx2", "popcnt", "avx512f", "avx512_vpopcntdq", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A fresh engine choice, on CPU flags the test sets (``cpu_features.cpu_flags``)."""
    monkeypatch.setattr(chem, "_CHOICES", {})
    yield monkeypatch


def _set_flags(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)


@pytest.mark.parametrize("cpu", [ZEN4, frozenset({"avx2", "popcnt"}), frozenset({"asimd"})])
def test_without_amx_the_flags_choose_popcount(
    flags: pytest.MonkeyPatch, cpu: frozenset[str]
) -> None:
    """AVX-512 without AMX (the EPYC of issue 20), AVX2, ARM: popcount, no probe run."""
    _set_flags(flags, cpu)
    flags.setattr(chem, "_probe", lambda: pytest.fail("no probe where the flags settle it"))
    choice = chem.choose_engine()
    assert choice.engine == "popcount" and choice.probe == {}
    assert "no AMX" in choice.reason
    assert chem.resolve_engine("auto", device="cpu") == "popcount"


def test_with_amx_a_probe_decides_and_its_verdict_is_cached(
    flags: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With AMX both engines are timed; the next process reads the verdict from the cache file,
    and a cache written on another machine (other key) is not believed."""
    _set_flags(flags, SAPPHIRE_RAPIDS)
    cache = tmp_path / "var" / "chem-engine.json"
    first = chem.choose_engine(cache)
    assert first.reason == "probe" and set(first.probe) == {"popcount", "gemm"}
    assert all(t > 0 for t in first.probe.values())
    assert first.engine == min(first.probe, key=first.probe.__getitem__)
    saved = json.loads(cache.read_text())
    assert saved["probe"] == first.probe and "amx_bf16" in saved["key"]

    flags.setattr(chem, "_CHOICES", {})  # a new process
    flags.setattr(chem, "_probe", lambda: pytest.fail("the cached verdict should be read"))
    again = chem.choose_engine(cache)
    assert again.engine == first.engine and again.probe == first.probe
    assert "cached" in again.reason

    flags.setattr(chem, "_CHOICES", {})
    cache.write_text(json.dumps({"key": "another machine", "probe": {"popcount": 1, "gemm": 0}}))
    flags.setattr(chem, "_probe", lambda: {"popcount": 2.0, "gemm": 1.0})
    other = chem.choose_engine(cache)
    assert (other.engine, other.reason) == ("gemm", "probe")


def test_the_choice_is_logged_once_with_the_cpu(
    flags: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _set_flags(flags, ZEN4)
    with caplog.at_level(logging.INFO, logger="models.compounds.chem"):
        chem.choose_engine()
        chem.choose_engine()
        fps = chem.Fingerprints.from_packed(np.full((4, 8), 3, np.uint8), 64)
        chem.top_k(fps, fps, 2, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "engine" in r.getMessage()]
    assert len(lines) == 1
    assert "popcount" in lines[0] and "avx512_vpopcntdq" in lines[0]
    assert cpu_features.cpu_model() in lines[0]


def test_each_forced_engine_is_what_runs() -> None:
    fps = chem.Fingerprints.from_packed(np.full((4, 256), 1, np.uint8), 2048)
    assert chem.engine_name(fps, fps, engine="popcount") == "popcount"
    assert chem.engine_name(fps, fps, engine="gemm-int8") == "gemm-int8"
    assert chem.engine_name(fps, fps, engine="gemm-bf16") == "gemm-bf16"
    expected = "gemm-bf16" if cpu_features.fast_bf16_gemm() else "gemm-int8"
    if not cpu_features.fast_bf16_gemm() and not cpu_features.fast_int8_gemm():
        expected = "gemm-float32"
    assert chem.engine_name(fps, fps, engine="gemm") == expected
    for setting in ("popcount", "gemm", "gemm-int8"):
        assert chem.resolve_engine(setting, device="cpu") == setting  # type: ignore[arg-type]


def test_bad_engines_are_refused() -> None:
    fps = chem.Fingerprints.from_packed(np.full((4, 8), 1, np.uint8), 64)
    with pytest.raises(ValueError, match="engine must be one of"):
        chem.top_k(fps, fps, 2, engine="fpga")  # type: ignore[arg-type]
    if torch.cuda.is_available():
        assert chem.resolve_engine("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="MEDBATCH_CHEM_ENGINE=cuda but torch sees no CUDA"):
            chem.top_k(fps, fps, 2, engine="cuda")


def test_the_setting_reads_medbatch_chem_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBATCH_CHEM_ENGINE", "popcount")
    assert Settings().chem_engine == "popcount"
    assert Settings().chem_engine_cache == Path("var/chem-engine.json")
    monkeypatch.setenv("MEDBATCH_CHEM_ENGINE", "quantum")
    with pytest.raises(pydantic.ValidationError, match="chem_engine"):
        Settings()


_TARGETS = {
    # target: (triple, cpu), instructions that must appear, instructions that must not
    "sapphirerapids": ("x86_64-unknown-linux-gnu", "sapphirerapids"),
    "znver4": ("x86_64-unknown-linux-gnu", "znver4"),
    "haswell": ("x86_64-unknown-linux-gnu", "haswell"),
    "neoverse-n1": ("aarch64-unknown-linux-gnu", "neoverse-n1"),
}


@pytest.mark.parametrize(
    ("target", "present", "absent"),
    [
        ("sapphirerapids", [r"vpopcntq\s+%zmm", r"vpminub\s+.*%zmm", r"vpaddusb"], [r"vpshufb"]),
        ("znver4", [r"vpopcntq\s+%zmm"], [r"vpshufb"]),
        ("haswell", [r"vpshufb\s+%ymm", r"vpminub\s+.*%ymm"], [r"vpopcntq", r"zmm"]),
        ("neoverse-n1", [r"\bcnt\s+v\d+\.16b", r"\bumin\s", r"\buqadd\s"], []),
    ],
)
def test_kernels_use_each_cpus_popcount(target: str, present: list[str], absent: list[str]) -> None:
    """LLVM lowers the kernels' ctpop on <8 x i64> to vpopcntq on 512-bit registers with
    AVX-512 VPOPCNTDQ, to a vpshufb nibble table with AVX2, to NEON cnt on ARM."""
    asm = chem_popcount.kernel_assembly(*_TARGETS[target])
    for pattern in present:
        assert re.search(pattern, asm), pattern
    for pattern in absent:
        assert not re.search(pattern, asm), pattern


def test_numba_compiles_vpopcntq_here_where_the_cpu_has_it() -> None:
    """What numba builds for this CPU (not the cached kernels: a fresh function on the same
    intrinsics) uses the vector popcount exactly when /proc/cpuinfo lists avx512_vpopcntdq."""

    @numba.njit(cache=False)
    def shared(q, lib):  # type: ignore[no-untyped-def]
        out = np.empty(lib.shape[0] // q.shape[0], np.int64)
        for row in range(out.shape[0]):
            out[row] = chem_popcount._count1(q, 0, lib, row * q.shape[0], q.shape[0])
        return out

    rng = np.random.default_rng(3)
    q = rng.integers(0, 2**63, size=32, dtype=np.uint64)
    lib = rng.integers(0, 2**63, size=32 * 5, dtype=np.uint64)
    expected = np.bitwise_count(q[None, :] & lib.reshape(5, 32)).sum(axis=1)
    assert np.array_equal(shared(q, lib), expected)
    asm = shared.inspect_asm(shared.signatures[0])
    has_vpopcnt = "avx512_vpopcntdq" in cpu_features.cpu_flags()
    assert bool(re.search(r"vpopcntq\s+%zmm", asm)) == has_vpopcnt
