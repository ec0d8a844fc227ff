"""What the compiler made of a kernel, read from its cubin: ptxas resource lines, SASS instruction counts along the
main path, and occupancy. Standard library only; used by ``bench.kernel_report`` (which documents the method).

The disassembly comes from ``nvdisasm`` (not ``cuobjdump -sass``) because it names branch targets by label and
annotates jump-table branches (``BRX ... (*"BRANCH_TARGETS ..."*)``), so the control-flow graph is exact.

Path counting (see ``analyse``): basic blocks and natural loops of the kernel's control-flow graph. Through a
loop-free region the counted path is the one that executes the most blocks containing a memory instruction and,
among those, the fewest instructions: it walks every load and store the code has on its way (all K*K taps, the
stores) and takes the cheapest side of branches that only compute (a runtime activation switch takes its cheapest
case). A ``CALL`` counts the counted path of its callee, so the outlined slow paths nvcc emits (64-bit integer
division, float reciprocal of denormals) lose to the inline fast path beside them.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------- parsing
_INSTR = re.compile(r'^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*(\(\*"BRANCH_TARGETS ([^"]*)"\*\))?\s*;\s*$')
_LABEL = re.compile(r"^([.$\w][\w.$]*):\s*$")
_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"`\(([^)]+)\)")

# Opcode classes (the part before the first dot).
_GLOBAL_MEM = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "LDGSTS"}
_OTHER_MEM = {"LDS", "STS", "LDSM", "ATOMS", "LDL", "STL"}
_FMA = {"FFMA", "DFMA", "HFMA2", "FFMA2"}


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "LDG.E.U16"
    predicated: bool
    targets: list[str]  # branch / call target labels

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclass
class Function:
    name: str  # mangled
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> instruction index


def disassemble(nvdisasm: str, cubin_path: str) -> dict[str, Function]:
    """{mangled kernel name: Function} of every kernel in the cubin (subroutines stay inside their kernel)."""
    out = subprocess.run([nvdisasm, "-c", cubin_path], capture_output=True, text=True, check=True).stdout
    return parse(out)


def parse(text: str) -> dict[str, Function]:
    funcs: dict[str, Function] = {}
    cur: Function | None = None
    pending: list[str] = []
    for line in text.splitlines():
        if m := _SECTION.match(line):
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            pending = []
            continue
        if cur is None:
            continue
        if m := _LABEL.match(line):
            pending.append(m.group(1))
            continue
        if not (m := _INSTR.match(line)):
            continue
        body = m.group(2)
        pred = _PRED.match(body)
        if pred:
            body = body[pred.end():]
        opcode = body.split(None, 1)[0]
        targets = _TARGET.findall(body) if not opcode.startswith("BSSY") else []
        if m.group(4):
            targets = [t.strip() for t in m.group(4).split(",") if t.strip()]
        for label in pending:
            cur.labels[label] = len(cur.instrs)
        pending = []
        predicated = pred is not None and pred.group(0).strip() not in ("@PT", "@UPT")
        cur.instrs.append(Instr(int(m.group(1), 16), opcode, predicated, targets))
    return funcs


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """{mangled function: {regs, spill_store_bytes, spill_load_bytes, stack_bytes, smem_bytes}} from ``ptxas -v``."""
    res: dict[str, dict[str, int]] = {}
    cur: str | None = None
    for line in text.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line):
            cur = m.group(1)
            res.setdefault(cur, {"regs": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
                                 "smem_bytes": 0})
        if cur is None:
            continue
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            res[cur].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                            spill_load_bytes=int(m.group(3)))
        if m := re.search(r"Used (\d+) registers", line):
            res[cur]["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                res[cur]["smem_bytes"] = int(s.group(1))
    return res


# ------------------------------------------------------------------------------------------------- the graph
@dataclass
class Block:
    start: int  # instruction indices [start, end)
    end: int
    succs: list[int] = field(default_factory=list)
    exits: bool = False  # may leave the kernel (EXIT, possibly predicated)


def _local_jump(x: Instr) -> bool:
    """A ``CALL.REL.NOINC`` to a label of the function itself (``.L_x_n``, not a ``$__internal`` subroutine): ptxas
    for sm_80 leaves loops that way (no return), so it is a branch."""
    return x.base == "CALL" and bool(x.targets) and all(t.startswith(".L") for t in x.targets)


def _blocks(fn: Function) -> list[Block]:
    ins = fn.instrs
    leaders = {0}
    for i, x in enumerate(ins):
        if x.base in ("BRA", "BRX", "JMX", "EXIT", "RET", "BPT") or _local_jump(x):
            leaders.add(i + 1)
        if x.base in ("BRA", "BRX", "JMX", "CALL"):  # a callee's entry starts a block too
            leaders.update(fn.labels[t] for t in x.targets if t in fn.labels)
    starts = sorted(s for s in leaders if s < len(ins))
    index = {s: b for b, s in enumerate(starts)}
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(ins)], strict=True)]
    for b in blocks:
        last = ins[b.end - 1]
        falls = b.end < len(ins)
        if last.base in ("BRA", "BRX", "JMX") or _local_jump(last):
            b.succs = [index[fn.labels[t]] for t in last.targets if t in fn.labels]
            falls = falls and last.predicated
        elif last.base in ("RET", "BPT"):
            falls = False
        elif last.base == "EXIT":
            b.exits = True
            falls = falls and last.predicated
        if falls:
            b.succs.append(index[b.end])
    return blocks


def _reachable(blocks: list[Block], start: int = 0) -> set[int]:
    """Blocks reachable from ``start`` along branches and fall-throughs (not into subroutines: CALL has no
    edge)."""
    seen, stack = {start}, [start]
    while stack:
        for s in blocks[stack.pop()].succs:
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return seen


@dataclass
class Loop:
    header: int
    nodes: set[int]
    latches: set[int]  # blocks with a back edge to the header
    children: list[Loop] = field(default_factory=list)


def _loops(blocks: list[Block], nodes: set[int], entry: int) -> list[Loop]:
    """Outermost natural loops among ``nodes`` (back edges found by an iterative DFS from ``entry``), inner loops
    as children."""
    back: dict[int, set[int]] = {}
    state: dict[int, int] = {entry: 1}  # 1 on the DFS stack, 2 done
    stack = [(entry, iter(blocks[entry].succs))]
    while stack:
        node, it = stack[-1]
        nxt = next((s for s in it if s in nodes), None)
        if nxt is None:
            state[node] = 2
            stack.pop()
        elif state.get(nxt) == 1:
            back.setdefault(nxt, set()).add(node)
        elif nxt not in state:
            state[nxt] = 1
            stack.append((nxt, iter(blocks[nxt].succs)))
    preds: dict[int, set[int]] = {n: set() for n in nodes}
    for n in nodes:
        for s in blocks[n].succs:
            if s in nodes:
                preds[s].add(n)
    loops = []
    for header, latches in back.items():
        body, work = {header}, list(latches)
        while work:
            n = work.pop()
            if n not in body:
                body.add(n)
                work.extend(preds[n])
        loops.append(Loop(header, body, latches))
    loops.sort(key=lambda lp: len(lp.nodes), reverse=True)
    outer: list[Loop] = []
    for lp in loops:  # largest first: a loop's parent is the smallest earlier loop holding its header
        parents = [o for o in _walk(outer) if lp.header in o.nodes and lp.nodes <= o.nodes]
        (min(parents, key=lambda o: len(o.nodes)).children if parents else outer).append(lp)
    return outer


def _walk(loops: list[Loop]):
    for lp in loops:
        yield lp
        yield from _walk(lp.children)


# ------------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Cost:
    """Instructions along a path, and how many of its blocks hold memory instructions."""

    mem_blocks: int = 0
    instrs: int = 0
    fma: int = 0
    global_mem: int = 0

    def __add__(self, o: Cost) -> Cost:
        return Cost(self.mem_blocks + o.mem_blocks, self.instrs + o.instrs, self.fma + o.fma,
                    self.global_mem + o.global_mem)

    def better(self, o: Cost | None) -> bool:
        return o is None or (self.mem_blocks, -self.instrs) > (o.mem_blocks, -o.instrs)

    def to_dict(self) -> dict[str, int]:
        return {"instrs": self.instrs, "fma": self.fma, "global_mem": self.global_mem}


def _best_path(nodes: set[int], succs: dict[int, list[int]], cost: dict[int, Cost], source: int,
               sinks: set[int]) -> Cost:
    """Best (see ``Cost.better``) source -> sink path through the DAG ``succs`` restricted to ``nodes``."""
    indeg = Counter(s for n in nodes for s in succs[n] if s in nodes)
    order, ready = [], [n for n in nodes if indeg[n] == 0]
    while ready:
        n = ready.pop()
        order.append(n)
        for s in succs[n]:
            if s in nodes:
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
    if len(order) != len(nodes):
        raise ValueError("SASS control flow is not reducible to loops + a DAG")
    best: dict[int, Cost] = {source: cost[source]}
    for n in order:
        if n not in best:
            continue
        for s in succs[n]:
            if s in nodes and (c := best[n] + cost[s]).better(best.get(s)):
                best[s] = c
    done = [best[s] for s in sinks if s in best]
    if not done:
        raise ValueError("no path from the entry to an exit in the SASS control flow")
    result = done[0]
    for c in done[1:]:
        if c.better(result):
            result = c
    return result


@dataclass(frozen=True)
class PathSummary:
    """Per-thread instruction counts of one kernel (see the module docstring).

    ``straight``: entry to exit, every loop counted once. ``outside`` + ``body`` * trips: the same with the main
    loop (the loop whose counted path has the most global loads/stores) taken ``trips`` times; None without loops.
    The main loop is the deepest loop nest, then the one with the most global loads/stores per iteration.
    ``inner``: one iteration of the main loop's heaviest inner loop (``body`` holds it once), so a plan can count
    it ``inner_trips`` times per main iteration (the CUDA kernels' runtime loop over kernel rows).
    """

    static_instrs: int
    straight: Cost
    outside: Cost | None
    body: Cost | None
    loops: int
    inner: Cost | None = None
    nest: dict | None = None  # the main loop as {"body": Cost, "children": [...]}, children in code order

    def to_dict(self) -> dict[str, object]:
        return {"static_instrs": self.static_instrs, "straight": self.straight.to_dict(),
                "outside": self.outside.to_dict() if self.outside else None,
                "body": self.body.to_dict() if self.body else None, "loops": self.loops,
                "inner": self.inner.to_dict() if self.inner else None, "nest": _nest_dict(self.nest)}

    @staticmethod
    def from_dict(d: dict) -> PathSummary:
        def cost(x: dict | None) -> Cost | None:
            return None if x is None else Cost(0, x["instrs"], x["fma"], x["global_mem"])

        straight = cost(d["straight"])
        assert straight is not None
        def nest(x: dict | None) -> dict | None:
            return None if x is None else {"body": cost(x["body"]), "children": [nest(c) for c in x["children"]]}

        return PathSummary(d["static_instrs"], straight, cost(d["outside"]), cost(d["body"]), d["loops"],
                           cost(d.get("inner")), nest(d.get("nest")))


def _nest_dict(n: dict | None) -> dict | None:
    return None if n is None else {"body": n["body"].to_dict(), "children": [_nest_dict(c) for c in n["children"]]}


def nested_body(nest: dict, trips: tuple) -> Cost:
    """One iteration of a loop with each inner loop taken its planned number of times: ``trips`` holds, per child
    in code order, (iterations per iteration of this loop, the child's own ``trips``). ``nest["body"]`` holds each
    child once; a body without inner loops (the compiler unrolled them) is taken as it is."""
    children = nest["children"]
    if not children:  # the compiler unrolled the planned inner loops: the body already holds every iteration
        return nest["body"]
    if len(children) != len(trips):
        raise ValueError(f"the plan expects {len(trips)} inner loops, the SASS has {len(children)}")
    total = nest["body"]
    for child, (n, sub) in zip(children, trips, strict=True):
        once, weighted = child["body"], nested_body(child, sub)
        total = Cost(0, total.instrs - once.instrs + round(n * weighted.instrs),
                     total.fma - once.fma + round(n * weighted.fma),
                     total.global_mem - once.global_mem + round(n * weighted.global_mem))
    return total


class _Paths:
    """Counted paths of one function's control-flow graph (see the module docstring)."""

    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.blocks = _blocks(fn)
        self.start_of = {b.start: i for i, b in enumerate(self.blocks)}
        self._callees: dict[str, Cost] = {}
        self._costs: dict[int, Cost] = {}

    def cost(self, n: int) -> Cost:
        """A block's own instructions, plus the counted path of every subroutine it calls (so that a call site
        is never cheaper than the inline fast path it stands beside)."""
        if n not in self._costs:
            b, ins = self.blocks[n], self.fn.instrs
            ops = Counter(x.base for x in ins[b.start:b.end])
            fma = sum(c for op, c in ops.items() if op in _FMA)
            fma -= sum(1 for x in ins[b.start:b.end] if x.opcode.startswith("HFMA2.MMA"))  # a move idiom
            glob = sum(c for op, c in ops.items() if op in _GLOBAL_MEM)
            mem = glob + sum(c for op, c in ops.items() if op in _OTHER_MEM)
            total = Cost(1 if mem else 0, b.end - b.start, fma, glob)
            for x in ins[b.start:b.end]:
                if x.base == "CALL" and not _local_jump(x):
                    for t in (t for t in x.targets if t in self.fn.labels):
                        c = self.callee(t)
                        total = total + Cost(0, c.instrs, c.fma, c.global_mem)
            self._costs[n] = total
        return self._costs[n]

    def callee(self, label: str) -> Cost:
        if label not in self._callees:
            self._callees[label] = Cost()  # a recursive call counts nothing more
            entry = self.start_of[self.fn.labels[label]]
            nodes = _reachable(self.blocks, entry)
            rets = {n for n in nodes if self.fn.instrs[self.blocks[n].end - 1].base == "RET"}
            self._callees[label] = self.through(nodes, entry, rets, _loops(self.blocks, nodes, entry), None)
        return self._callees[label]

    def body(self, lp: Loop) -> Cost:
        """One iteration: header to a latch, inner loops once each."""
        owner = {n: c.header for c in lp.children for n in c.nodes}
        latches = {owner.get(n, n) for n in lp.latches}
        return self.through(lp.nodes, lp.header, latches, lp.children, None, drop_edges_to=lp.header)

    def through(self, region: set[int], entry: int, sinks: set[int], loops: list[Loop], forced: Loop | None,
                drop_edges_to: int | None = None) -> Cost:
        """Counted path entry -> sink through ``region`` with each of ``loops`` collapsed into its header carrying
        one iteration, except ``forced``, which costs nothing but must be on the path (a huge mem_blocks count:
        the caller adds its iterations)."""
        owner = {n: lp.header for lp in loops for n in lp.nodes}
        nodes = {owner.get(n, n) for n in region}
        succs: dict[int, list[int]] = {n: [] for n in nodes}
        for n in region:
            src = owner.get(n, n)
            for t in self.blocks[n].succs:
                dst = owner.get(t, t)
                if t in region and dst != src and dst != drop_edges_to and dst not in succs[src]:
                    succs[src].append(dst)
        costs = {n: self.cost(n) for n in nodes}
        for lp in loops:
            costs[lp.header] = Cost(10**6) if lp is forced else self.body(lp)
        return _best_path(nodes, succs, costs, owner.get(entry, entry), {owner.get(n, n) for n in sinks})


def analyse(fn: Function) -> PathSummary:
    paths = _Paths(fn)
    nodes = _reachable(paths.blocks)
    outer = _loops(paths.blocks, nodes, 0)
    exits = {n for n in nodes if paths.blocks[n].exits}
    def plain(c: Cost) -> Cost:  # mem_blocks only steer the path choice
        return Cost(0, c.instrs, c.fma, c.global_mem)

    straight = plain(paths.through(nodes, 0, exits, outer, None))
    outside = body = inner = None
    if outer:
        def heaviest(loops: list[Loop]) -> Loop:
            return max(loops, key=lambda lp: (paths.body(lp).global_mem, paths.body(lp).instrs))

        def tree(lp: Loop) -> dict:
            kids = sorted(lp.children, key=lambda c: paths.blocks[c.header].start)
            return {"body": plain(paths.body(lp)), "children": [tree(c) for c in kids]}

        def depth(lp: Loop) -> int:
            return 1 + max((depth(c) for c in lp.children), default=0)

        # The main loop: the deepest nest (the CUDA strip and item loops hold the kernel-row loop; a parameter
        # staging loop may load more per iteration but runs once), then the most global loads/stores.
        main = max(outer, key=lambda lp: (depth(lp), paths.body(lp).global_mem, paths.body(lp).instrs))
        outside, body = plain(paths.through(nodes, 0, exits, outer, main)), plain(paths.body(main))
        if main.children:
            inner = plain(paths.body(heaviest(main.children)))
        return PathSummary(len(fn.instrs), straight, outside, body, sum(1 for _ in _walk(outer)), inner, tree(main))
    return PathSummary(len(fn.instrs), straight, outside, body, sum(1 for _ in _walk(outer)), inner)


# ------------------------------------------------------------------------------------------------- occupancy
@dataclass(frozen=True)
class SmLimits:
    regs: int = 65536
    smem: int = 228 * 1024  # per SM
    smem_reserved_per_block: int = 1024  # the runtime's own shared memory per block (sm_80 and later)
    threads: int = 2048
    blocks: int = 32
    reg_alloc_unit: int = 256  # registers per warp are allocated in units of 256


SM_LIMITS = {90: SmLimits(), 80: SmLimits(smem=164 * 1024)}


def blocks_per_sm(regs: int, smem_bytes: int, threads: int, limits: SmLimits) -> int:
    """Resident blocks per SM (the CUDA occupancy calculator's arithmetic); 0 when one block does not fit."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // limits.reg_alloc_unit) * limits.reg_alloc_unit
    by_regs = (limits.regs // regs_per_warp) // warps
    by_smem = limits.smem // (smem_bytes + limits.smem_reserved_per_block)
    by_threads = limits.threads // (warps * 32)
    return max(0, min(by_regs, by_smem, by_threads, limits.blocks))
