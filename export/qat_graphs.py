"""A QAT model's integers as ONNX tensors and nodes, shared by the int4 and int8 exporters and the fused decoder graphs.

- :func:`nbits_arrays` packs BlockQuantLinears into ``MatMulNBits`` inputs (the contrib-op spec's layout, as
  ``onnxruntime.quantization.matmul_nbits_quantizer`` writes it)::

      B        uint8 [N, k_blocks, block_size * bits / 8]   per output row, K in blocks; 4-bit: element 2j in the low
                                                            nibble of byte j, element 2j+1 in the high nibble
      scales   float [N, k_blocks]
      (no zero_points input: the default, 2^(bits-1), i.e. 8 for int4 and 128 for 8 bits, so the stored value is q + 8)

- :func:`embedding_nodes` writes a QuantEmbedding's int8 lookup in one of :data:`EMBEDDING_FORMS`.
- :func:`dequantized` swaps the fake quant for the float weights it computes (what a trace stores), and
  :func:`to_matmul_nbits` rewrites a traced graph's MatMuls and Gathers of those tensors into the integer forms.

Nothing here imports another exporter, so every exporter can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsk_compress.errors import ExportError
from dsk_compress.export import graph_files

if TYPE_CHECKING:
    from torch import nn

ACCURACY_LEVEL = 4
"""MatMulNBits' compute type: int8 activations quantized per block at run time (what int4 QAT simulates)."""


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed integers ``q [N, K]`` (``K`` a multiple of ``block``) as MatMulNBits' ``B``: uint8 ``[N, K / block, block * bits / 8]``,
    each value stored plus the default zero point ``2^(bits-1)``; 4-bit values two per byte, the first in the low nibble."""
    n, k = q.shape
    if k % block:
        raise ExportError(f"pack_nbits: K={k} is not a multiple of the block {block}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.min(initial=0) < lo or q.max(initial=0) > hi:
        raise ExportError(f"pack_nbits: values outside the {bits}-bit range [{lo}, {hi}]")
    u = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(n, k // block, block)
    if bits == 8:
        return u
    if bits != 4:
        raise ExportError(f"pack_nbits: {bits}-bit weights are not supported (4 or 8)")
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_nbits(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The signed integers ``[N, K]`` that :func:`pack_nbits` packed (for tests and inspection)."""
    n = packed.shape[0]
    if bits == 4:
        u = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)
    else:
        u = packed.reshape(n, -1)
    return u[:, :k].astype(np.int16) - 2 ** (bits - 1)


def nbits_arrays(mods: list) -> dict:
    """One MatMulNBits for the BlockQuantLinears ``mods`` that read the same input (outputs concatenated along N, as
    q/k/v or gate/up): ``{"B", "scales", "bias" (or None), "attrs"}``. Their bits, block and input width must agree."""
    first = mods[0]
    key = {(m.weight_bits, m.block_size, m.in_features) for m in mods}
    if len(key) > 1:
        raise ExportError("BlockQuantLinears packed into one MatMulNBits must share bits, block size and input width")
    qs, ss = zip(*(m.integer_weight() for m in mods))
    q = np.concatenate([x.numpy() for x in qs], axis=0)
    scales = np.concatenate([x.numpy() for x in ss], axis=0).astype(np.float32)
    bias = None
    if any(m.bias is not None for m in mods):
        bias = np.concatenate(
            [m.bias.detach().float().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32) for m in mods]
        )
    attrs = {
        "K": first.in_features,
        "N": int(q.shape[0]),
        "bits": first.weight_bits,
        "block_size": first.block_size,
        "accuracy_level": ACCURACY_LEVEL,
    }
    return {"B": pack_nbits(q, first.weight_bits, first.block_size), "scales": scales, "bias": bias, "attrs": attrs}


def embedding_block(hidden: int) -> int:
    """GatherBlockQuantized's block along the hidden axis for one scale per row: the largest power of two up to
    ``hidden`` (the kernel takes powers of two from 16; a last, shorter block repeats the row's scale too)."""
    if hidden < 16:
        raise ExportError(f"an int8 embedding needs a hidden size of at least 16 (GatherBlockQuantized's block), got {hidden}")
    return 1 << (hidden.bit_length() - 1)


def embedding_arrays(emb) -> tuple[np.ndarray, np.ndarray, int]:
    """A QuantEmbedding as GatherBlockQuantized's inputs: the uint8 table ``[V, H]`` (int8 + 128), the float32 scales
    ``[V, ceil(H / block)]`` (each row's scale repeated) and the block."""
    table, scales = emb.integer_table()
    table, scales = table.numpy(), scales.numpy().astype(np.float32)
    block = embedding_block(table.shape[1])
    blocks = -(-table.shape[1] // block)
    return (table.astype(np.int16) + 128).astype(np.uint8), np.repeat(scales[:, None], blocks, axis=1), block


EMBEDDING_FORMS = ("block", "rows")
"""How a graph looks up an int8 embedding: ``block``, one ``GatherBlockQuantized`` (com.microsoft, ``bits`` 8: onnxruntime
1.23 and later; the int4 graphs, which need 1.22 anyway); ``rows``, standard operators that any onnxruntime runs (the int8
graphs): Gather of the int8 rows, Gather of their scales, Cast, Mul. Both compute ``q * scale`` in float32, bit for bit the
fake quant's numbers."""


def embedding_nodes(add_init, add_node, emb, ids: str, name: str, output: str | None = None, form: str = "block") -> str:
    """The int8 embedding lookup of a QuantEmbedding ``emb`` in one of :data:`EMBEDDING_FORMS`.

    ``add_init(name, array) -> name`` and ``add_node(op, inputs, name, output or None, **attrs) -> output`` write into the
    caller's graph; ``output`` names the result (default: a fresh name). Returns the output name.
    """
    if form == "rows":
        table, scales = (t.numpy() for t in emb.integer_table())
        rows = add_node("Gather", [add_init(f"{name}.weight_int8", table), ids], f"{name}/Gather", None)
        scale = add_node("Gather", [add_init(f"{name}.weight_scale", scales.astype(np.float32)[:, None]), ids], f"{name}/GatherScale", None)
        rows = add_node("Cast", [rows], f"{name}/Cast", None, to=1)  # TensorProto.FLOAT
        return add_node("Mul", [rows, scale], f"{name}/Mul", output)
    table, scales, block = embedding_arrays(emb)
    inputs = [add_init(f"{name}.weight_q8", table), ids, add_init(f"{name}.weight_scale", scales)]
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 8}
    return add_node("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", output, domain="com.microsoft", **attrs)


@contextlib.contextmanager
def dequantized(model: nn.Module):
    """``model`` with each BlockQuantLinear swapped for an ``nn.Linear`` holding the weight its fake quant computes and each
    QuantEmbedding for an ``nn.Embedding`` of its dequantized table (in place, restored on exit), and the tensors it
    holds: ``{id: module}`` keyed by :func:`_fingerprint` of every such weight, stored ``[K, N]`` (a MatMul's weight)
    and ``[N, K]``, and of the tables."""
    import torch
    from torch import nn

    from dsk_compress.compress.qat import BlockQuantLinear, QuantEmbedding

    swaps, found = [], {}
    with torch.no_grad():
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BlockQuantLinear):
                    w = child.quantized_weight().detach().float()
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    plain.weight = nn.Parameter(w, requires_grad=False)
                    if child.bias is not None:
                        plain.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
                    found[_fingerprint(w.numpy().T)] = child
                    found[_fingerprint(w.numpy())] = child
                elif isinstance(child, QuantEmbedding):
                    table, scales = child.integer_table()
                    w = table.float() * scales[:, None]
                    plain = nn.Embedding(child.num_embeddings, child.embedding_dim, padding_idx=child.padding_idx)
                    plain.weight = nn.Parameter(w, requires_grad=False)
                    found[_fingerprint(w.numpy())] = child
                else:
                    continue
                swaps.append((parent, child_name, child))
                setattr(parent, child_name, plain)
    try:
        yield found
    finally:
        for parent, child_name, child in swaps:
            setattr(parent, child_name, child)


def _fingerprint(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def to_matmul_nbits(path: str | Path, found: dict, embedding: str = "block") -> dict:
    """Rewrite the graph at ``path`` in place: each MatMul whose weight (an initializer, or a Transpose of one) is a
    BlockQuantLinear's dequantized weight becomes that layer's MatMulNBits; each Gather of a QuantEmbedding's dequantized
    table its int8 lookup (:func:`embedding_nodes` in the ``embedding`` form). ``found`` is what :func:`dequantized`
    yields. Returns ``{"matmul_nbits", "int8_embeddings"}`` (counts)."""
    import onnx
    from onnx import helper, numpy_helper

    from dsk_compress.compress.qat import QuantEmbedding

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    fps: dict[str, tuple] = {}

    def fp(name: str):
        if name not in inits:
            return None
        if name not in fps:
            fps[name] = _fingerprint(numpy_helper.to_array(inits[name]))
        return fps[name]

    producers = {o: n for n in g.node for o in n.output}
    names = {n.name for n in g.node} | set(inits) | {o for n in g.node for o in n.output}
    new_inits = []

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def add_init(name: str, array) -> str:
        name = fresh(name)
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    out_nodes, counts = [], {"matmul_nbits": 0, "int8_embeddings": 0}

    def add_node(op, inputs, name, output=None, domain="", **attrs):
        name = fresh(name)
        out = output or fresh(f"{name}/out")
        out_nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain or None, **attrs))
        return out

    for node in g.node:
        if node.op_type == "MatMul":
            w = node.input[1]
            src = producers.get(w)
            mod = found.get(fp(w)) if w in inits else None
            if mod is None and src is not None and src.op_type == "Transpose" and src.input[0] in inits:
                mod = found.get(fp(src.input[0]))
            if mod is not None and not isinstance(mod, QuantEmbedding):
                arrays = nbits_arrays([mod])
                stem = node.name or "matmul"
                inputs = [
                    node.input[0],
                    add_init(f"{stem}.weight_q{arrays['attrs']['bits']}", arrays["B"]),
                    add_init(f"{stem}.weight_scale", arrays["scales"]),
                ]
                add_node("MatMulNBits", inputs, f"{stem}/MatMulNBits", node.output[0], domain="com.microsoft", **arrays["attrs"])
                counts["matmul_nbits"] += 1
                continue
        if node.op_type == "Gather" and node.input[0] in inits:
            mod = found.get(fp(node.input[0]))
            if isinstance(mod, QuantEmbedding):
                embedding_nodes(
                    add_init,
                    lambda op, i, n, o, **a: add_node(op, i, n, o, **a),
                    mod,
                    node.input[1],
                    node.name or "embed_tokens",
                    node.output[0],
                    embedding,
                )
                counts["int8_embeddings"] += 1
                continue
        out_nodes.append(node)
    del g.node[:]
    g.node.extend(out_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph_files.save(m, path, check=False)
    return counts
