"""int4 QAT models as ONNX graphs: ONNX Runtime's ``MatMulNBits`` packed from the QAT model's own integers and scales.

A :class:`~dsk_compress.compress.qat.BlockQuantLinear` becomes one ``MatMulNBits`` (com.microsoft) with
``accuracy_level`` 4, whose kernel quantizes its input per row and per block exactly as the fake quant does; nothing is
re-quantized: the packed integers are :meth:`BlockQuantLinear.integer_weight`'s and the scales its learned ones.
Layout (the contrib-op spec, as ``onnxruntime.quantization.matmul_nbits_quantizer`` writes it)::

    B        uint8 [N, k_blocks, block_size * bits / 8]   per output row, K in blocks; 4-bit: element 2j in the low
                                                          nibble of byte j, element 2j+1 in the high nibble
    scales   float [N, k_blocks]
    (no zero_points input: the default, 2^(bits-1), i.e. 8 for int4 and 128 for 8 bits, so the stored value is q + 8)

A :class:`~dsk_compress.compress.qat.QuantEmbedding` becomes one ``GatherBlockQuantized`` (com.microsoft, ``bits`` 8):
the int8 table stored as uint8 ``[V, H]`` (q + 128, the operator's default zero point) and its row scales repeated
per block of ``H`` (a power of two, see :func:`embedding_block`), so the lookup dequantizes the rows it gathers, in
one kernel, to exactly the numbers the fake quant computes.

Three graphs of one model (``export_int4_lm``, ``export_int4_kv``; the fused decoder graph is written by
:mod:`dsk_compress.export.fused` with :func:`nbits_arrays` and :func:`embedding_nodes`): the full-sequence and KV-cache
graphs are traced from the model with its fake quant replaced by the float weights it computes
(:func:`dequantized`), then every MatMul whose weight is such a tensor becomes its ``MatMulNBits`` and the embedding
``Gather`` its int8 form (:func:`to_matmul_nbits`); each is checked against the fake-quant torch model.
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


def _expected(model: nn.Module) -> dict:
    from dsk_compress.compress.qat import QuantEmbedding, block_quant_layers

    return {"matmul_nbits": len(block_quant_layers(model)), "int8_embeddings": sum(isinstance(m, QuantEmbedding) for m in model.modules())}


def _check_counts(got: dict, model: nn.Module, what: str) -> None:
    want = _expected(model)
    if got != want:
        raise ExportError(
            f"{what}: {got['matmul_nbits']} of {want['matmul_nbits']} int4 QAT Linears became MatMulNBits and "
            f"{got['int8_embeddings']} of {want['int8_embeddings']} int8 embeddings were found in the traced graph",
            hint="report a bug (the traced weights no longer match the fake quant's)",
        )


def export_int4_lm(
    model: nn.Module, example: np.ndarray, path: str | Path, opset: int = 17, optimization: str = "extended", *, min_sqnr_db: float
) -> dict:
    """The full-sequence graph of an int4 QAT causal LM at ``path`` (ORT-optimized), checked against its fake quant on ``example``.

    Returns ``{"path", "precision", "sqnr_db_vs_fake_quant", "max_abs_diff_vs_fake_quant", "matmul_nbits", "int8_embeddings",
    "fused_ops"}``; raises ExportError when a layer was not packed or the SQNR is below ``min_sqnr_db``.
    """
    from dsk_compress.compress.qat import sqnr_db
    from dsk_compress.export.onnx import export_causal_lm, fused_ops, lm_logits, op_histogram, ort_optimize, ort_predict, raw_path

    path = Path(path)
    model = model.eval()
    ref = lm_logits(model, example)
    raw = raw_path(path)
    with dequantized(model) as found:
        export_causal_lm(model, example, raw, opset)
    counts = to_matmul_nbits(raw, found)
    _check_counts(counts, model, path.name)
    ort_optimize(raw, path, optimization)
    graph_files.remove(raw)
    got = ort_predict(path)(example)
    sqnr = round(sqnr_db(ref, got), 2)
    if sqnr < min_sqnr_db:
        raise ExportError(f"{path.name}: int4 ONNX vs torch fake-quant SQNR {sqnr} dB is below {min_sqnr_db} dB", hint="report a bug")
    return {
        "path": path,
        "precision": "int4",
        "sqnr_db_vs_fake_quant": sqnr,
        "max_abs_diff_vs_fake_quant": float(np.abs(got - ref).max()),
        **counts,
        "fused_ops": fused_ops(op_histogram(path)),
    }


def export_int4_kv(
    model: nn.Module,
    path: str | Path,
    example: np.ndarray,
    opset: int = 17,
    optimization: str = "extended",
    *,
    min_sqnr_db: float,
    new_tokens: int = 8,
) -> dict:
    """The KV-cache graph of an int4 QAT decoder at ``path``, checked by greedy decoding against its fake quant
    (:func:`~dsk_compress.export.kv_cache.check_kv_parity` on the first (up to) 16 tokens of ``example[0]``).

    Returns ``{"path", "prompt_tokens", <parity numbers>, "matmul_nbits", "int8_embeddings"}``, or ``{"error"}`` when the KV
    exporter cannot handle the model; raises ExportError when the step-logit SQNR is below ``min_sqnr_db`` or the tokens differ.
    """
    from dsk_compress.export.kv_cache import check_kv_parity, export_causal_lm_with_past
    from dsk_compress.export.onnx import ort_optimize

    path = Path(path)
    model = model.eval()
    raw = path.with_name(path.name.removesuffix(".onnx") + ".raw.onnx")
    try:
        with dequantized(model) as found:
            export_causal_lm_with_past(model, raw, opset)
    except ExportError as e:
        return {"error": e.message}
    counts = to_matmul_nbits(raw, found)
    _check_counts(counts, model, path.name)
    ort_optimize(raw, path, optimization)
    graph_files.remove(raw)
    prompt = np.asarray(example)[0, : min(16, np.asarray(example).shape[1])]
    info = {"path": path, "prompt_tokens": int(prompt.size), **check_kv_parity(model, path, prompt, new_tokens=new_tokens), **counts}
    if info["step_logits_sqnr_db"] < min_sqnr_db or not info["tokens_match"]:
        raise ExportError(
            f"{path.name}: int4 KV step-logit SQNR {info['step_logits_sqnr_db']} dB vs torch fake-quant (min {min_sqnr_db}), "
            f"greedy tokens {'equal' if info['tokens_match'] else 'differ'}",
            hint="set stages.N.kv_cache: false and report a bug",
        )
    return info
