"""Compile a preset's train step for a TPU slice or NVIDIA GPUs from any host (ahead of time).

`python -m jaxllm.compile PRESET --topology NAME [key.sub=value ...]`

NAME is a Cloud TPU name (`v5e-16`, `v5p-128`, `v6e-256`; for v4 / v5p the number counts
TensorCores, two per chip, as the Cloud names do), jax's `GEN:AxB[xC]` chip grid (`v5e:4x4`,
`v5p:2x2x1`), or GPUs: `h200`, `h100-8` (one host), `h200-16` (hosts of 8). Needs the
compiler (libtpu: the `tpu` extra; jax's CUDA plugin: the `cuda` extra) but no TPU or GPU: jax
builds the devices from a description (`jaxllm.parallel.core.topology`), the mesh comes from
`parallel.mesh`, and the real train step (`jaxllm.training.step.make_train_step`) is lowered
on abstract state and compiled. A GPU's memory is what jax's allocator may take
(XLA_PYTHON_CLIENT_MEM_FRACTION of the card, 0.75 by default).
Prints the mesh, per-chip memory (arguments, temporaries, total vs the chip's HBM) and FLOPs
per step: what the compiled program does (XLA's ops, Pallas kernels by the estimate they
declare) beside the model's count that MFU uses. Exit codes: 0 fits, 3 does not fit, 2 bad
preset / topology / key, 1 anything else.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import jax
from jax._src.lib import _jax
from jaxlib import _hlo

from jaxllm import choices, config
from jaxllm.models.flops import flops_per_token
from jaxllm.parallel.core.topology import (
    GiB,
    Topology,
    TopologyError,
    compiler_available,
    cuda_available,  # noqa: F401  (re-exported: `aot.cuda_available()`)
    parse_topology,
    topology_devices,
    topology_mesh,
    tpu_available,  # noqa: F401  (re-exported)
)
from jaxllm.training.loop import check_batch_layout
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step

USAGE = "python -m jaxllm.compile PRESET --topology NAME [key.sub=value ...]"

EXIT_FITS, EXIT_ERROR, EXIT_USAGE, EXIT_OOM = 0, 1, 2, 3


@dataclass
class Report:
    topology: Topology
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_chip: float  # the compiled program's (loop_aware_flops), kernels included
    host_argument_bytes: int = 0  # pinned host memory (train.optimizer_offload)
    host_temp_bytes: int = 0  # pinned host memory (train.remat=offload)
    loops_counted_once: int = 0  # while loops whose trip count was not found (loop_aware_flops)
    model_flops_per_chip: float = 0.0  # MFU's count: active weights + token mixing, no remat
    kernels_without_flops: int = 0  # kernel calls that declare no FLOPs (counted as 0)

    @property
    def total_bytes(self) -> int:
        # Donated state is aliased to the outputs: counted once.
        return (
            self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes
        )  # fmt: skip

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.topology.chip.hbm_bytes

    def lines(self) -> list[str]:
        hbm = self.topology.chip.hbm_bytes
        gib = lambda b: f"{b / GiB:8.2f} GiB"
        total_flops = self.flops_per_chip * self.topology.chips
        bound = self.flops_per_chip / self.topology.chip.peak_bf16_flops
        return [
            f"topology     {self.topology.jax_name} ({self.topology.chips} chips, "
            f"{hbm / GiB:.0f} GiB {'usable' if self.topology.chip.platform == 'cuda' else 'HBM'}"
            " each)",
            f"mesh         {self.mesh}",
            "memory per chip",
            f"  arguments   {gib(self.argument_bytes)}",
            f"  outputs     {gib(self.output_bytes)}  (aliased: {gib(self.alias_bytes)})",
            f"  temporaries {gib(self.temp_bytes)}",
            f"  code        {gib(self.code_bytes)}",
            f"  host        {gib(self.host_argument_bytes)} arguments, "
            f"{gib(self.host_temp_bytes)} temporaries (pinned host memory, not HBM)",
            f"  total       {gib(self.total_bytes)}  of {gib(hbm)} "
            f"({100 * self.total_bytes / hbm:.1f}%)",
            f"flops/step   {self.flops_per_chip:.4g} per chip, {total_flops:.4g} in all "
            f"(>= {bound * 1e3:.1f} ms at peak bf16)"
            + (
                f"; {self.loops_counted_once} loop(s) counted once"
                if self.loops_counted_once
                else ""
            )
            + (
                f"; {self.kernels_without_flops} kernel call(s) without a FLOP estimate"
                if self.kernels_without_flops
                else ""
            ),
            f"  model      {self.model_flops_per_chip:.4g} per chip (MFU's count: active "
            "weights and token mixing, no recompute)",
            "fits" if self.fits else "DOES NOT FIT",
        ]


def lower_train_step(cfg, topo: Topology):
    """`cfg`'s train step lowered for `topo` (a `jax.stages.Lowered`) and its mesh."""
    lowered, trainer = _lower(cfg, topo)
    return lowered, trainer.mesh


def _lower(cfg, topo: Topology):
    devices = topology_devices(topo)
    sizes = cfg.parallel.mesh.resolve(len(devices))
    check_batch_layout(cfg, sizes)
    mesh = topology_mesh(sizes, devices)
    trainer = Trainer.create(cfg, mesh)
    state = trainer.abstract_state()
    lead = (trainer.steps_per_call,) if trainer.steps_per_call > 1 else ()
    shape = (*lead, cfg.data.batch_size, cfg.data.seq_len)
    sharding = trainer.train_batch_sharding
    batch = {
        k: jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=sharding)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=sharding)
    return make_train_step(trainer).lower(state, batch), trainer


def model_flops_per_step(cfg, trainer: Trainer) -> float:
    """FLOPs of one call of the train step by the model's count (`flops_per_token`, what MFU
    divides by): active weights and token mixing, forward + backward, no remat recompute."""
    params = trainer.model.abstract_params
    n_params = sum(x.size for x in jax.tree.leaves(params))
    per_token = flops_per_token(cfg.model, n_params, params["embed"].size, cfg.data.seq_len)
    return per_token * cfg.data.batch_size * cfg.data.seq_len * trainer.steps_per_call


_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_WHILE = re.compile(r"\bwhile\(.*condition=%([\w.\-]+), body=%([\w.\-]+)")
_CALLED = re.compile(r"\b(?:calls|to_apply|branch_computations|called_computations)=\{?([^}]*)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# a Pallas kernel's call (Mosaic on TPU, Triton on GPU) and the FLOPs its CostEstimate declares
_KERNEL = re.compile(r'custom_call_target="(?:tpu_custom_call|__gpu\$xla\.gpu\.triton)"')
_DECLARED = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


@dataclass
class HloModuleText:
    """A compiled module's text (`compiled.as_text()`) cut into its computations."""

    header: str  # the `HloModule name, ...` line
    preamble: list[str]  # what precedes the first computation (file and stack-frame tables)
    computations: dict[str, list[str]]  # name -> its lines, "ENTRY " removed
    entry: str

    @classmethod
    def parse(cls, text: str) -> HloModuleText:
        lines = text.splitlines()
        preamble, comps, entry, cur = [], {}, "", None
        for line in lines[1:]:
            m = _COMPUTATION.match(line)
            if m and cur is None:
                cur = m.group(2)
                comps[cur] = [line.removeprefix("ENTRY ")]
                entry = cur if m.group(1) else entry
            elif cur is not None:
                comps[cur].append(line)
                cur = None if line == "}" else cur
            elif not comps:
                preamble.append(line)
        return cls(lines[0], preamble, comps, entry)

    def with_entry(self, name: str) -> str:
        """The module's text with computation `name` as its entry (the header keeps only the
        module's name: the real entry's layouts and aliasing do not apply)."""
        text = [self.header.split(",")[0], *self.preamble]
        for c, lines in self.computations.items():
            text += ["ENTRY " + lines[0] if c == name else lines[0], *lines[1:]]
        return "\n".join(text) + "\n"

    def reachable(self, name: str) -> list[str]:
        """`name` and every computation it calls, loop bodies included (each once)."""
        seen = [name]
        for c in seen:
            for line in self.computations[c]:
                names = " ".join(_CALLED.findall(line))
                if w := _WHILE.search(line):
                    names += f" %{w.group(1)} %{w.group(2)}"
                for callee in re.findall(r"%([\w.\-]+)", names):
                    if callee in self.computations and callee not in seen:
                        seen.append(callee)
        return seen

    def loops(self, name: str | None = None) -> list[tuple[str, int | None]]:
        """(body, trip count or None) of each while loop computation `name` (default: the
        entry) runs, in itself or in what it calls (fusions, calls, branches), not inside
        another loop. The trip count is the loop's `known_trip_count`, else the one constant
        its condition compares the counter with (jax's loops count up from 0)."""
        out, seen = [], set()

        def visit(c: str) -> None:
            for line in self.computations[c]:
                if w := _WHILE.search(line):
                    out.append((w.group(2), self._trip(w.group(1), line)))
                    continue
                for group in _CALLED.findall(line):
                    for callee in re.findall(r"%([\w.\-]+)", group):
                        if callee in self.computations and callee not in seen:
                            seen.add(callee)
                            visit(callee)

        visit(name or self.entry)
        return out

    def _trip(self, condition: str, instruction: str) -> int | None:
        if known := _TRIP.search(instruction):
            return int(known.group(1))
        cond = "\n".join(self.computations[condition])
        consts = re.findall(r"constant\((\d+)\)", cond)
        if len(consts) == 1 and re.search(r"direction=[LG]T\b", cond):
            return int(consts[0])
        return None


def loop_aware_flops(hlo_text: str) -> tuple[float, int]:
    """FLOPs of a compiled module (its `as_text()`) with each while loop's body counted once
    per iteration, and how many loops had no readable trip count (counted once).

    XLA's cost analysis counts a loop body once, so a `lax.scan` over layers
    (`model.scan_layers`) or micro-batches would look U times cheaper. Here each computation
    is made the entry of a copy of the module and costed by XLA's own analysis (on the CPU
    client: the count is the same HloCostAnalysis), then
    cost(c) = once(c) + Σ over the loops c runs (trip · cost(body) − once(body)).

    XLA counts a kernel's custom call as 0 FLOPs; `once` adds the FLOPs each kernel declares
    (Pallas `CostEstimate`: ours, megablox, XLA's own ragged-dot kernels; jax's splash
    declares none, see `kernels_without_flops`). A declared estimate is for the call's static
    shapes: a grouped GEMM over a worst-case buffer (dropless expert parallelism) is counted
    whole, though its kernel visits only the routed rows' tiles.
    """
    module = HloModuleText.parse(hlo_text)
    client = jax.devices("cpu")[0].client
    once_cache: dict[str, float] = {}
    unknown = 0

    def once(name: str) -> float:
        if name not in once_cache:
            hlo = _hlo.hlo_module_from_text(module.with_entry(name))
            xla = float(_jax.hlo_module_cost_analysis(client, hlo).get("flops", 0))
            once_cache[name] = xla + sum(
                float(m.group(1))
                for c in module.reachable(name)
                for line in module.computations[c]
                if _KERNEL.search(line) and (m := _DECLARED.search(line))
            )
        return once_cache[name]

    def cost(name: str) -> float:
        nonlocal unknown
        total = once(name)
        for body, trip in module.loops(name):
            unknown += trip is None
            total += (trip or 1) * cost(body) - once(body)
        return total

    return cost(module.entry), unknown


def kernels_without_flops(hlo_text: str) -> int:
    """Kernel calls in a compiled module that declare no FLOPs (XLA counts them as 0)."""
    return sum(
        1 for line in hlo_text.splitlines() if _KERNEL.search(line) and not _DECLARED.search(line)
    )


def compile_for(cfg, topo: Topology) -> Report:
    """Lower and compile `cfg`'s train step on `topo`; the memory and FLOPs it needs."""
    lowered, trainer = _lower(cfg, topo)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    # XLA's own count takes each loop body once (layer scan, micro-batches): per iteration here
    text = compiled.as_text()
    flops, unknown = loop_aware_flops(text)
    return Report(
        topology=topo,
        mesh=dict(trainer.mesh.shape),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops_per_chip=flops,
        loops_counted_once=unknown,
        model_flops_per_chip=model_flops_per_step(cfg, trainer) / topo.chips,
        kernels_without_flops=kernels_without_flops(text),
        host_argument_bytes=int(mem.host_argument_size_in_bytes),
        host_temp_bytes=int(mem.host_temp_size_in_bytes),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n\n" + __doc__.split("\n", 4)[4].strip())
        return EXIT_FITS
    topo_name = None
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--topology":
            topo_name = next(it, None)
        elif a.startswith("--topology="):
            topo_name = a.split("=", 1)[1]
        else:
            rest.append(a)
    bad = [a for a in rest if a.startswith("--")]
    if topo_name is None or bad or not rest or "=" in rest[0]:
        print(f"error: {'unknown option ' + bad[0] if bad else 'usage'}: {USAGE}", file=sys.stderr)
        return EXIT_USAGE
    preset, overrides = rest[0], rest[1:]

    try:
        topo = parse_topology(topo_name)
        cfg = config.load(preset, overrides)
        choices.check(cfg)
    except (TopologyError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not compiler_available(topo):
        need = "jax's CUDA plugin: pip install 'jaxllm[cuda]'" if topo.chip.platform == "cuda" \
            else "libtpu: pip install 'jaxllm[tpu]'"  # fmt: skip
        print(f"error: compiling for {topo.jax_name} needs {need}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = compile_for(cfg, topo)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # XLA reports HBM exhaustion at compile time on some versions
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            print(f"{cfg.name} on {topo.jax_name}: DOES NOT FIT\n{str(e)[:2000]}")
            return EXIT_OOM
        raise
    print(f"{cfg.name} on {topo.jax_name}")
    print("\n".join(report.lines()))
    return EXIT_FITS if report.fits else EXIT_OOM


if __name__ == "__main__":
    sys.exit(main())
