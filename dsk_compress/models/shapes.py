"""Shape rules of a Hugging Face config that transformers only discovers deep inside the first forward pass.

Read from the plain ``config.json`` dict (no transformers import), so ``--dry-run`` and the model loader
share them without an import cycle.
"""

from __future__ import annotations

from dsk_compress.errors import DskError, RecipeError


def check_attention_shape(cfg: dict, field: str, error: type[DskError] = RecipeError) -> None:
    """Refuse a config whose hidden size does not split into its heads, or heads into KV heads (a clean error, not a
    shape error deep inside the first forward pass)."""

    def num(key):
        v = cfg.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    hidden, heads, kv, head_dim = num("hidden_size"), num("num_attention_heads"), num("num_key_value_heads"), num("head_dim")
    if heads is not None and heads <= 0:
        raise error(f"{field}: num_attention_heads is {heads}", hint="give a positive number of heads in config.json")
    if kv is not None and kv <= 0:
        raise error(f"{field}: num_key_value_heads is {kv}", hint="give a positive number of KV heads in config.json")
    if heads and kv and heads % kv:
        raise error(
            f"{field}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}",
            hint="every KV head serves the same number of query heads; fix config.json",
        )
    if heads and hidden and not head_dim and hidden % heads:
        raise error(
            f"{field}: hidden_size {hidden} is not divisible by num_attention_heads {heads}",
            hint="set head_dim in config.json or choose a hidden_size that is a multiple of the heads",
        )
