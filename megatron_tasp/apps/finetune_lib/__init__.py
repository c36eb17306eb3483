"""Building blocks of ``megatron-tasp finetune`` (one concern per module).

- :mod:`.recipe`: the YAML recipe schema, validation, overrides, shipped recipes (no torch).
- :mod:`.tokenizer`: byte-level tokenizer; Hugging Face tokenizers on request.
- :mod:`.data`: corpus -> cached token stream -> fixed-length windows, seeded order, CP zigzag split.
- :mod:`.model`: Megatron-Core GPTModel with TASP core attention from a recipe.
- :mod:`.optimizer`: AdamW with fp32 masters sharded over DP x CP ranks; warmup + cosine schedule.
- :mod:`.checkpoint`: crash-safe Megatron distributed checkpoints (temp dir, atomic rename, ``latest``).
- :mod:`.metrics`: progress bar, metrics.json, loss plot.
- :mod:`.trainer`: the training loop on an initialised process group.
- :mod:`.launch`: how ranks start (torchrun/srun, forked CPU workers, torchrun re-exec on GPUs).

Only :mod:`.recipe` is imported here; the rest imports torch / Megatron when used.
"""

from megatron_tasp.apps.finetune_lib.recipe import (
    DEFAULT_RECIPE,
    Recipe,
    RecipeError,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    schema_text,
)

__all__ = ["DEFAULT_RECIPE", "Recipe", "RecipeError", "list_recipes", "load_recipe", "recipe_from_dict", "schema_text"]
