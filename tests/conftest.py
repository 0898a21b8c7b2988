"""Test session set-up: the CPU with 8 virtual devices, set before jax starts."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With the tpu extra, every xdist worker that compiles for a TPU topology loads libtpu, whose
# single-process lockfile would otherwise abort the second worker.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
# The suite is compile-bound: compiled programs go to a persistent cache that the xdist workers
# share (within one run, e.g. a train step's sampler compiled again by `generate`, and across
# runs). Keys hash the program, jax/XLA versions and flags, so a hit is the same executable.
# Not where libtpu or jax's CUDA plugin is installed: executables compiled ahead of time for a
# TPU topology or a GPU are cached too, and a compile-only client cannot read them back.
# JAXLLM_TEST_CACHE=DIR forces the cache on, JAXLLM_TEST_CACHE= (empty) off.
_aot_compilers = ["libtpu"]
if importlib.util.find_spec("jax_plugins") is not None:
    _aot_compilers += ["jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"]
_cache = os.environ.get("JAXLLM_TEST_CACHE")
if _cache is None and not any(importlib.util.find_spec(m) for m in _aot_compilers):
    _cache = str(Path(__file__).resolve().parents[1] / ".jax_cache")
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    # `gpu` tests run where JAX sees a GPU (JAX_PLATFORMS=cuda, benchmarks/gpu.sh); elsewhere
    # they are reported as skipped, not silently passed.
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (JAX_PLATFORMS=cuda)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
