"""Native CPU kernels (engine/cpu/csrc/): built on first use with torch's C++ extension tooling, cached per CPU and
source, and loaded as torch ops (`torch.ops.prefixserve.*`).

Where no compiler is present, the build fails or the CPU is not x86-64/arm64 Linux or macOS, `load_kernels`
returns None with the reason, and the engine keeps its portable backend (engine/attention/portable.py: gather + SDPA),
logged at start-up: a missing compiler never fails a request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from prefixserve.engine.errors import UnsupportedModelError

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("paged_decode.cpp", "layer_ops.cpp", "greedy.cpp"))
CACHE_ENV = "PREFIXSERVE_KERNEL_CACHE"  # where builds are kept; default ~/.cache/prefixserve/kernels


@dataclass(frozen=True)
class Kernels:
    """The native ops (torch.ops.prefixserve.*), each from the source file its comment names."""

    paged_decode: Callable[..., None]  # paged_decode.cpp
    rms_norm: Callable[..., torch.Tensor]  # layer_ops.cpp
    add_rms_norm: Callable[..., torch.Tensor]  # layer_ops.cpp
    rope_store: Callable[..., torch.Tensor]  # layer_ops.cpp
    store_kv: Callable[..., None]  # layer_ops.cpp
    greedy_pick: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # greedy.cpp
    build_dir: Path
    build_info: Callable[[], str]  # paged_decode.cpp: "threads=2 vector_floats=8"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def compile_flags(cpu_flags: set[str], system: str) -> list[str]:
    """-march=native, OpenMP (at::parallel_for runs the kernel on one thread without it) where the compiler
    has it, and the widest at::vec width this CPU runs (without one, at::vec is plain loops: correct, slower)."""
    flags = ["-O3", "-march=native", "-DNDEBUG"]
    if system == "Linux":
        flags.append("-fopenmp")  # at run time the symbols bind to the libgomp torch has loaded already
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags:
        flags.append("-DCPU_CAPABILITY_AVX512")
    elif {"avx2", "fma"} <= cpu_flags:
        flags.append("-DCPU_CAPABILITY_AVX2")
    return flags


def _build_signature(flags: list[str]) -> str:
    """What the build depends on: -march=native compiles for this CPU, so another CPU gets its own build."""
    cpu = sorted(_cpu_flags())
    parts = [platform.machine(), " ".join(cpu), " ".join(flags), torch.__version__]
    parts += [p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@cache
def load_kernels() -> tuple[Kernels | None, str]:
    """(the kernels, how they were found) or (None, why not). Built once per CPU and source; later loads
    take milliseconds."""
    if platform.system() not in ("Linux", "Darwin"):
        return None, f"no native kernels on {platform.system()}"
    if _compiler() is None:
        return None, "no C++ compiler found (install g++, or set CXX)"
    try:
        import ninja  # torch's extension builder runs the ninja binary from this package

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        if shutil.which("ninja") is None:
            return None, "no ninja build tool (pip install ninja)"
    from torch.utils import cpp_extension

    flags = compile_flags(_cpu_flags(), platform.system())
    name = f"prefixserve_kernels_{_build_signature(flags)}"
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefixserve" / "kernels")
    build_dir = root / name
    if not (build_dir / f"{name}.so").exists():
        log.info(
            "building the native attention kernel for this CPU, once (about 25 s on 2 cores) in %s", build_dir
        )
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a compiler that fails, a read-only cache: the portable path serves
        return None, f"building the native kernels failed ({type(exc).__name__}: {str(exc)[-500:]})"
    ops = torch.ops.prefixserve
    kernels = Kernels(
        ops.paged_decode,
        ops.rms_norm,
        ops.add_rms_norm,
        ops.rope_store,
        ops.store_kv,
        ops.greedy_pick,
        build_dir,
        ops.build_info,
    )
    return kernels, f"built in {build_dir} ({ops.build_info()})"


def native_kernels(backend: str, device: torch.device, dtype: torch.dtype) -> Kernels | None:
    """The native kernels where --attention-backend asks for them and they can run (None: the portable path,
    plain PyTorch throughout). `native` where they cannot run is a start-up error; `auto` falls back, saying why."""
    if backend == "portable":
        log.info("attention: the portable path (gather + matmul), as --attention-backend asks")
        return None
    why_not, how, kernels = None, "", None
    if device.type != "cpu":
        why_not = f"the native kernels are CPU kernels, and the model is on {device.type}"
    elif dtype not in (torch.float32, torch.bfloat16):
        why_not = f"the native kernels support float32 and bfloat16, not {dtype}"
    else:
        kernels, how = load_kernels()
        if kernels is None:
            why_not = how
    if kernels is None:
        if backend == "native":
            raise UnsupportedModelError(
                f"--attention-backend native: {why_not}; use --attention-backend auto to fall back to the "
                "portable path"
            )
        log.warning("attention: the portable path (gather + matmul), since %s", why_not)
        return None
    log.info("attention and layer ops: the native kernels (%s)", how)
    return kernels
