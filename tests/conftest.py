"""Test session set-up: the CPU with 8 virtual devices, set before jax starts."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With the tpu extra, every xdist worker that compiles for a TPU topology loads libtpu, whose
# single-process lockfile would otherwise abort the second worker.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
