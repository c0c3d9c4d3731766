"""Planning targets: chip data sheets, TPU slice topologies and GPU counts (`--topology`, `--gpu`)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from jaxllm.errors import UserError

GiB = 1024 ** 3
EXIT_FITS, EXIT_USER_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3

# libtpu release that jax[tpu]==0.10.2 pins (its metadata: libtpu==0.0.42.*).
LIBTPU_PIN = "libtpu==0.0.42.1"


class PlanError(UserError):
    """The plan cannot be made: unknown topology, sharding/compile failure, missing libtpu."""


# --------------------------------------------------------------------------------------------
# Chip specs (per chip; vendor data sheets). HBM is what one JAX device can address.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
    # GPUs: memory as nvidia-smi reports it (H100 SXM 81559 MiB, H200 143771 MiB), dense bf16 peak.
    "h100": Chip("NVIDIA H100", 81559 * 2 ** 20, 989e12, 3.35e12),
    "h200": Chip("NVIDIA H200", 143771 * 2 ** 20, 989e12, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class TpuGen:
    chip: str  # key of CHIPS
    topo_prefix: str  # generation name in libtpu topology strings ("v5:4x4x8")
    cores_per_chip: int  # the N of "v5p-N" counts TensorCores
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config: str  # "megacore": one JAX device per chip (both TensorCores)


TPU_GENS = {
    "v4": TpuGen("v4", "v4", 2, 3, "megacore"),
    "v5p": TpuGen("v5p", "v5", 2, 3, "megacore"),
    "v5e": TpuGen("v5e", "v5e", 1, 2, "default"),
    "v5litepod": TpuGen("v5e", "v5e", 1, 2, "default"),
    "v6e": TpuGen("v6e", "v6e", 1, 2, "default"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to plan for: `chips` devices in `slices` slices (TPU) or nodes (GPU)."""
    label: str  # as the user wrote it
    platform: str  # "tpu" or "gpu"
    chip: Chip
    chips: int  # in all
    slices: int = 1
    topology: str = ""  # libtpu topology name of one slice, e.g. "v5:4x4x8"
    chip_config: str = "default"
    wrap: tuple = (False, False, False)
    chips_per_host: tuple = (2, 2, 1)


def _shape_3d(chips: int) -> Optional[tuple]:
    """Slice shape of a v4/v5p slice: the small sizes are fixed; from 64 chips on, every dimension
    is a multiple of 4 (full cubes), as balanced as possible (GCP's standard shapes)."""
    small = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
    if chips in small:
        return small[chips]
    if chips % 64:
        return None
    best = None
    for a in range(4, round(chips ** (1 / 3)) + 5, 4):
        for b in range(a, int(math.sqrt(chips // a)) + 5, 4):
            c, rem = divmod(chips, a * b)
            if rem or c < b or c % 4:
                continue
            key = (c, -a)  # smallest longest side, then the largest shortest side
            if best is None or key < best[0]:
                best = (key, (a, b, c))
    return best[1] if best else None


def _shape_2d(chips: int) -> Optional[tuple]:
    sizes = (1, 2, 4, 8, 16)
    shapes = [(a, b) for a in sizes for b in sizes if a <= b and a * b == chips and b <= 2 * a + (a == 1)]
    return shapes[0] if shapes else None


def parse_topology(name: str, slices: int = 1) -> Target:
    """'v5p-256', 'v4-128', 'v5e-16', 'v5litepod-16', 'v6e-64', or a raw 'v5p:4x4x8' -> Target."""
    if slices < 1:
        raise PlanError(f"--num-slices {slices} must be >= 1")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
    if not m:
        raise PlanError(f"--topology {name!r}: expected e.g. v5p-8, v5p-256, v4-128, v5e-16, v5litepod-16, "
                        f"v6e-64 or a shape like v5p:4x4x8")
    gen = TPU_GENS[m.group(1)]
    if m.group(2) == ":":
        shape = tuple(int(x) for x in m.group(3).split("x") if x)
        if len(shape) != gen.dims or min(shape, default=0) < 1:
            raise PlanError(f"--topology {name!r}: a {m.group(1)} shape has {gen.dims} sizes, e.g. "
                            f"{m.group(1)}:{'x'.join(['4'] * gen.dims)}")
        chips = math.prod(shape)
    else:
        if not m.group(3).isdigit():
            raise PlanError(f"--topology {name!r}: the part after '-' is a number, e.g. {m.group(1)}-8")
        count = int(m.group(3))
        chips, rem = divmod(count, gen.cores_per_chip)
        shape = (_shape_3d(chips) if gen.dims == 3 else _shape_2d(chips)) if not rem and chips else None
        if shape is None:
            unit = " (the number counts TensorCores, 2 per chip)" if gen.cores_per_chip == 2 else ""
            ex = "8, 16, 32, 64, 128, 256, 512, 1024" if gen.dims == 3 else "1, 4, 8, 16, 32, 64, 128, 256"
            raise PlanError(f"--topology {name!r} is not a standard slice{unit}; use {m.group(1)}-N with N in "
                            f"{ex}, ... or give the shape, e.g. {m.group(1)}:{'x'.join(['4'] * gen.dims)}")
    if gen.dims == 3:
        wrap = tuple([all(s % 4 == 0 for s in shape)] * 3)  # full cubes of 4x4x4 and up are tori
    else:
        wrap = tuple(s == 16 for s in shape) + (False,)
    per_host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    topo = f"{gen.topo_prefix}:{'x'.join(map(str, shape))}"
    label = name + (f" x {slices} slices" if slices > 1 else "")
    return Target(label, "tpu", CHIPS[gen.chip], chips * slices, slices, topo, gen.chip_config, wrap, per_host)


def parse_gpu(name: str) -> Target:
    """'h100x8' (one node of 8), 'h100x64' (8 nodes of 8), 'h200x16', ... -> Target."""
    m = re.fullmatch(r"(h100|h200)x([0-9]+)", name.strip().lower())
    if not m or int(m.group(2)) < 1:
        raise PlanError(f"--gpu {name!r}: expected KINDxCOUNT with KIND in h100, h200, e.g. h100x8 or h200x64")
    n = int(m.group(2))
    nodes = max(1, -(-n // 8))
    if n > 8 and n % 8:
        raise PlanError(f"--gpu {name!r}: more than one node needs a multiple of 8 GPUs (8 per node)")
    return Target(name, "gpu", CHIPS[m.group(1)], n, nodes)


CHIPS_BY_NAME = {c.name: c for c in CHIPS.values()}
