"""The XLA flags that make the CPU tests compile faster (tests/conftest.py sets them for the suite;
tests/multidevice_checks.py, a script, for its own process). No imports beyond the standard library:
XLA reads XLA_FLAGS when jax starts its backend, so they are set before that.

On CPU, compiling dominates the suite: the programs are tiny and nearly each is compiled once, so
LLVM's optimisations cost far more than they save at run time (they are about a third of the
compile time).
"""
import os
import subprocess
import sys

CPU_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_llvm_disable_expensive_passes": "true",
                 "xla_cpu_parallel_codegen_split_count": "1"}
# Flags that a jaxlib may not know (XLA aborts on an unknown flag), so each is tried in a subprocess
# first. The older elemental emitters compile the suite's programs faster than the fusion emitters:
# 15-22% less time on two subsets (tests/test_examples.py, tests/test_spec_decoder.py; jaxlib 0.10.2).
PROBED_CPU_XLA_FLAGS = {"xla_cpu_use_fusion_emitters": "false"}


def known_to_xla(flag: str) -> bool:
    """Whether this jaxlib starts its CPU backend with `flag` in XLA_FLAGS (about 2 s)."""
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def with_cpu_flags(given: str) -> str:
    """`given` (XLA_FLAGS) with each flag of CPU_XLA_FLAGS, and each of PROBED_CPU_XLA_FLAGS that
    this jaxlib knows, that it does not set put before it. pytest-xdist's workers inherit the result,
    so they find the probed flags already set and do not probe again."""
    ours = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if f"--{name}=" not in given]
    ours += [f"--{name}={value}" for name, value in PROBED_CPU_XLA_FLAGS.items()
             if f"--{name}=" not in given and known_to_xla(f"--{name}={value}")]
    return " ".join([*ours, given]).strip()
