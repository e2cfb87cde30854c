"""`kernel_census`: how many kernels a compiled XLA program launches, read from its optimized HLO.

After XLA's fusion passes, each instruction left at the top level of a computation that runs (the
entry, a while loop's body and condition, a conditional's branches, a called computation) becomes
one unit of device work: a fusion is one kernel, a custom call (a Pallas kernel, a cuBLAS gemm)
one launch, a top-level copy one memcpy. On a GPU that is the executable's thunk sequence, so at
a small batch, where each kernel does little, the count is what a decoding step pays for.
Instructions that move no data (parameters, constants, tuples, bitcasts) are free.

Usage:
    text = jax.jit(step).lower(*args).compile().as_text()
    kernel_census(text).total                 # the whole program, each loop body counted once
    kernel_census(text, scope="loop").total   # the largest while loop's body: one iteration

Caveats: a custom call may launch more than one kernel (a split-K gemm, a kernel with a separate
merge), and XLA's command buffers (CUDA graphs) batch many kernels into one launch; both are
visible only in a profile. `graph_launches` counts each command-buffer call as one launch.
"""

from __future__ import annotations

import dataclasses
import re

SCOPES = ("program", "loop")

# Instructions that launch nothing: they name, bundle or reinterpret buffers.
_FREE = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
    "opt-barrier", "domain", "partition-id", "replica-id", "get-dimension-size"})
# The second half of an async pair: its work was counted at the start.
_ASYNC_TAIL = re.compile(r"-(done|update)$")
_MATMUL_OPS = frozenset({"dot", "convolution", "ragged-dot"})
_MATMUL_TARGET = re.compile(r"gemm|matmul|cublas", re.IGNORECASE)

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-_]*)\(")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class KernelCensus:
    """Kernel launches of a compiled program (or of one iteration of its main loop).

    Attributes:
        total: instructions that launch device work (fusions, custom calls, copies, unfused ops).
        matmuls: those that multiply matrices: a dot or convolution alone or inside a fusion, or a
            gemm custom call (cuBLAS).
        custom_calls: custom calls (Pallas/Mosaic kernels, cuBLAS, cuDNN).
        copies: top-level copies (a memcpy or a copy kernel on a GPU).
        graph_launches: `total`, with each call of an XLA command buffer (a CUDA graph) as one launch.
        by_opcode: (opcode, count) pairs of the counted instructions, most frequent first.
        by_name: (kind, count) pairs, most frequent first: a fusion's name without its numbering
            (XLA names one after its kind and ops, e.g. "loop_add_fusion", "gemm_fusion_dot"), a
            custom call's target, else the opcode.
    """

    total: int
    matmuls: int
    custom_calls: int
    copies: int
    graph_launches: int
    by_opcode: tuple[tuple[str, int], ...]
    by_name: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"by_opcode": dict(self.by_opcode), "by_name": dict(self.by_name)}


@dataclasses.dataclass
class _Instruction:
    name: str
    opcode: str
    callees: tuple[str, ...]  # computations it runs (fused computations, loop bodies, branches)
    line: str


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """{computation name: its instructions} and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None or line.startswith("}"):
            current = None if line.startswith("}") else current
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        rest = instruction.group(2)
        # The result type comes first (a tuple type holds no "name(" pattern), then the opcode.
        opcode = _OPCODE.search(rest)
        if opcode is None:
            continue
        callees = [name for _, name in _CALLEES.findall(rest)]
        for _, group in _BRANCHES.findall(rest):
            callees += [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
        computations[current].append(_Instruction(instruction.group(1), opcode.group(1), tuple(callees), rest))
    if entry is None:
        raise ValueError("hlo_text has no ENTRY computation: pass the text of compiled.as_text()")
    return computations, entry


def _runs_matmul(computations, name: str, seen: set[str]) -> bool:
    """Whether computation `name` (a fused computation) multiplies matrices, nested fusions included."""
    if name in seen or name not in computations:
        return False
    seen.add(name)
    for inst in computations[name]:
        if inst.opcode in _MATMUL_OPS:
            return True
        if inst.opcode == "custom-call" and _MATMUL_TARGET.search(_target(inst.line)):
            return True
        if any(_runs_matmul(computations, callee, seen) for callee in inst.callees):
            return True
    return False


def _target(line: str) -> str:
    match = _TARGET.search(line)
    return match.group(1) if match else ""


class _Counter:
    def __init__(self, computations):
        self.computations = computations
        self.opcodes: dict[str, int] = {}
        self.names: dict[str, int] = {}
        self.total = self.matmuls = self.custom_calls = self.copies = self.graph_launches = 0

    def add(self, inst: _Instruction, graph_launch: bool = True) -> None:
        self.total += 1
        self.graph_launches += graph_launch
        self.opcodes[inst.opcode] = self.opcodes.get(inst.opcode, 0) + 1
        kind = _kind(inst)
        self.names[kind] = self.names.get(kind, 0) + 1
        if inst.opcode == "custom-call":
            self.custom_calls += 1
        if inst.opcode in ("copy", "copy-start"):
            self.copies += 1
        if (inst.opcode in _MATMUL_OPS
                or (inst.opcode == "custom-call" and _MATMUL_TARGET.search(_target(inst.line)))
                or (inst.opcode == "fusion" and any(_runs_matmul(self.computations, c, set()) for c in inst.callees))):
            self.matmuls += 1

    def walk(self, name: str, in_graph: bool = False) -> None:
        """Counts the instructions that run when computation `name` runs once."""
        for inst in self.computations.get(name, ()):
            if inst.opcode in _FREE or _ASYNC_TAIL.search(inst.opcode):
                continue
            if inst.opcode == "while":
                for callee in inst.callees:
                    self.walk(callee, in_graph)
            elif inst.opcode == "conditional":
                # One branch runs: count the largest.
                branches = [self._sub(callee, in_graph) for callee in inst.callees]
                if branches:
                    self.merge(max(branches, key=lambda c: c.total))
            elif inst.opcode == "call":
                graph = "command_buffer" in " ".join(inst.callees)
                if graph and not in_graph:
                    self.graph_launches += 1
                for callee in inst.callees:
                    self.walk(callee, in_graph or graph)
            else:
                self.add(inst, graph_launch=not in_graph)

    def _sub(self, name: str, in_graph: bool) -> _Counter:
        counter = _Counter(self.computations)
        counter.walk(name, in_graph)
        return counter

    def merge(self, other: _Counter) -> None:
        for field in ("total", "matmuls", "custom_calls", "copies", "graph_launches"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        for opcode, n in other.opcodes.items():
            self.opcodes[opcode] = self.opcodes.get(opcode, 0) + n
        for kind, n in other.names.items():
            self.names[kind] = self.names.get(kind, 0) + n

    def census(self) -> KernelCensus:
        def ranked(counts):
            return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

        return KernelCensus(total=self.total, matmuls=self.matmuls, custom_calls=self.custom_calls,
                            copies=self.copies, graph_launches=self.graph_launches,
                            by_opcode=ranked(self.opcodes), by_name=ranked(self.names))


def _kind(inst: _Instruction) -> str:
    """What kind of kernel an instruction is: see `KernelCensus.by_name`."""
    if inst.opcode == "custom-call":
        return _target(inst.line) or inst.opcode
    if inst.opcode == "fusion":
        return re.sub(r"([._]\d+)+$", "", inst.name)
    return inst.opcode


def kernel_census(hlo_text: str, scope: str = "program") -> KernelCensus:
    """Counts the kernel launches of an optimized HLO module (`compiled.as_text()`).

    Args:
        hlo_text: the text of a compiled executable's HLO module (after XLA's optimizations).
        scope: "program": the entry computation, each while loop's body and condition counted
            once; "loop": one iteration of the largest top-level while loop (body and condition),
            e.g. one token of a decoding loop.

    Returns:
        A KernelCensus.

    Raises:
        ValueError: an unknown scope, text with no entry computation, or scope="loop" for a
            program without a while loop.
    """
    if scope not in SCOPES:
        raise ValueError(f"{scope=} is not one of {SCOPES}")
    computations, entry = _parse(hlo_text)
    counter = _Counter(computations)
    if scope == "program":
        counter.walk(entry)
        return counter.census()
    loops = []
    for inst in _top_level(computations, entry):
        if inst.opcode == "while":
            loop = _Counter(computations)
            for callee in inst.callees:
                loop.walk(callee)
            loops.append(loop)
    if not loops:
        raise ValueError("scope='loop' needs a program with a while loop, and this one has none")
    return max(loops, key=lambda c: c.total).census()


def _top_level(computations, name: str):
    """The instructions of `name` and of the computations it calls (not fused ones, not loop bodies)."""
    for inst in computations.get(name, ()):
        yield inst
        if inst.opcode == "call":
            for callee in inst.callees:
                yield from _top_level(computations, callee)
