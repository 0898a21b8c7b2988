"""What the kernels' entry points share: the checks of their [B, T, H, ·] inputs, the GPU
module's lazy import and the choice of kernel by the platform a computation is lowered for.

Which kernel runs is decided by the platform the computation is *lowered* for, not by
`jax.default_backend()`: an ahead-of-time compile for a TPU topology is traced on a CPU host
and must still get the Mosaic kernel. `lax.platform_dependent` traces every branch but lowers
only the one for the lowering platform, so an entry point calls `dispatch` inside its
custom_vjp's forward and backward rules (a custom_vjp is lowered after differentiation, and
platform_dependent composes with jit, vmap and grad like any `cond`):
- TPU: the package's `tpu.py` (Mosaic);
- CUDA: its `gpu.py` (the Triton lowering), imported lazily; where it is missing or fails to
  import, the TPU kernel in interpret mode (correct but slow: `gpu_module(...) is None` tells
  callers to prefer an XLA path instead);
- anything else (the CPU): the TPU kernel in Pallas interpret mode.
"""

import functools
import importlib
import warnings

import jax.numpy as jnp
from jax import lax

from kernels_pallas.documents import document_runs

BACKENDS = (None, "tpu", "gpu")


@functools.cache
def gpu_module(package: str):
    """`{package}.gpu`, or None (with a warning) where it does not import."""
    try:
        return importlib.import_module(f"{package}.gpu")
    except Exception as e:  # a missing file, or an import-time failure of the Triton backend
        warnings.warn(f"{package}: GPU kernel unavailable ({e!r})", stacklevel=2)
        return None


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_inputs(name, q_BTHK, v_BTHV, initial_state, segment_ids):
    """Raise on v, initial_state or segment_ids that do not fit q [B, T, H, K] (T ≥ 1); return
    the document runs of segment_ids [B, T] (None without)."""
    if v_BTHV.ndim != 4 or v_BTHV.shape[:3] != q_BTHK.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q's [B, T, H], got {v_BTHV.shape}")
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    if T < 1:
        raise ValueError(f"{name} needs at least one token")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}")
    if segment_ids is None:
        return None
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
    return document_runs(segment_ids)


def dispatch(package, backend, interpret, run_tpu, run_gpu, *args):
    """run_tpu(interpret, *args) or run_gpu(gpu_module, interpret, *args).

    backend: None (by the lowering platform), "tpu" or "gpu". interpret: None or False (a
    kernel where one applies, interpret mode elsewhere), or True / a `pltpu.InterpretParams`
    to interpret the chosen kernel (TPU's unless backend="gpu"; the GPU kernel takes any of
    them as True: the TPU interpreter cannot run a Triton kernel, the generic one can)."""

    def gpu(interpret, *args):
        module = gpu_module(package)
        if module is None:
            return run_tpu(True if interpret is False else interpret, *args)
        return run_gpu(module, interpret if isinstance(interpret, bool) else True, *args)

    if interpret not in (None, False):
        return (gpu if backend == "gpu" else run_tpu)(interpret, *args)
    if backend == "tpu":
        return run_tpu(False, *args)
    if backend == "gpu":
        return gpu(False, *args)
    return lax.platform_dependent(
        *args,
        tpu=functools.partial(run_tpu, False),
        cuda=functools.partial(gpu, False),
        default=functools.partial(run_tpu, True),
    )


def round_up(n, m):
    return -(-n // m) * m


def pad_T(x, T):
    """Zero-pad axis 2 (tokens, of a head-major [B, H, T, ·] array) up to T."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, T - x.shape[2]), (0, 0)))
