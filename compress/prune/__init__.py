"""Structured pruning of dense decoders (Llama family; DeepSeek-V3 students without head pruning): FFN channels,
attention heads and whole decoder layers. MoE experts are pruned in ``compress.moe.prune_experts``.

Three modules, one concern each:

- ``importance``: how much each structure matters. Criteria are objects (``Magnitude`` for l1 / l2,
  ``Taylor``, ``Activation``; ``importance(name)`` looks one up) that score FFN channels and KV groups
  and give torch-pruning's group importance; activation scores and block influence (ShortGPT:
  ``1 - cos(input, output)`` of a layer's hidden states on calibration data) are measured with hooks.
- ``surgery``: cutting the model in place, per model family (per-head q/k/v attention: Llama,
  Mistral, Qwen2, Qwen3; multi-head latent attention: DeepSeek-V3 students): decoder layers,
  KV groups with their query heads, FFN channels (torch-pruning's dependency graph or by hand), and
  the config rewrite after each step so the pruned model saves, reloads and exports like any other
  model of its family. ``prune_to`` / ``prune_step`` are the entry points.
- ``targets``: what to prune to. ``Shape`` and the rounding rules, progressive schedules
  (``interpolate``), checks that name the argument at fault, parameter / MAC targets solved for one
  common ratio (candidates built from the config and counted, MACs with ``torch.utils.flop_counter``)
  and ``measure_latency`` for latency budgets (each candidate exported to ONNX and timed).

Import from this package: every public name is re-exported here.
"""

from dsk_compress.compress.prune.importance import (
    IMPORTANCES,
    Activation,
    Importance,
    Magnitude,
    Taylor,
    activation_scores,
    block_influence,
    importance,
)
from dsk_compress.compress.prune.surgery import (
    PruneTimeout,
    prune_ffn_channels,
    prune_kv_groups,
    prune_step,
    prune_to,
    remove_layers,
)
from dsk_compress.compress.prune.targets import (
    STRUCTURES,
    Shape,
    check_head_pruning,
    check_prunable,
    count_macs,
    ffn_keep,
    has_kv_heads,
    interpolate,
    kv_keep,
    layers_to_remove,
    measure_cost,
    measure_latency,
    ratio_shape,
    shape_of,
    shaped_config,
    solve_target,
    structure,
    uniform_shape,
)
from dsk_compress.models.common import count_params

__all__ = [
    "IMPORTANCES",
    "Activation",
    "Importance",
    "Magnitude",
    "Taylor",
    "STRUCTURES",
    "PruneTimeout",
    "Shape",
    "activation_scores",
    "block_influence",
    "importance",
    "check_head_pruning",
    "check_prunable",
    "count_macs",
    "count_params",
    "ffn_keep",
    "has_kv_heads",
    "interpolate",
    "kv_keep",
    "layers_to_remove",
    "measure_cost",
    "measure_latency",
    "prune_ffn_channels",
    "prune_kv_groups",
    "prune_step",
    "prune_to",
    "ratio_shape",
    "remove_layers",
    "shape_of",
    "shaped_config",
    "solve_target",
    "structure",
    "uniform_shape",
]
