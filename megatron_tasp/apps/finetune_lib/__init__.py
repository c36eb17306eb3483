"""Building blocks of ``megatron-tasp finetune`` (one concern per module).

- :mod:`.sections`: the recipe's sections as frozen dataclasses: every field, its type, default and meaning.
- :mod:`.recipe`: the validated :class:`Recipe`, cross-field checks, overrides, shipped recipes (no torch).
- :mod:`.tokenizer`: byte-level tokenizer; Hugging Face tokenizers on request.
- :mod:`.data`: corpus -> cached documents -> packed documents (:mod:`.packing`) or fixed-length windows.
- :mod:`.packing`: documents packed into sequences with per-document masks (THD), Megatron's PackedSeqParams.
- :mod:`.blend`: held-out split, the seeded order (sample k a pure function of (seed, k)), weighted blends.
- :mod:`.indexed`: Megatron indexed datasets (.bin/.idx) read with megatron.core's IndexedDataset.
- :mod:`.rope`: RoPE context extension (``model.rope_scaling``): its checks and its Megatron-Core plan.
- :mod:`.model`: Megatron-Core GPTModel with TASP core attention from a recipe.
- :mod:`.optimizer`: Megatron-Core's DDP, optimizer and LR scheduler (a small AdamW stand-in on CPU).
- :mod:`.checkpoint`: crash-safe Megatron distributed checkpoints (temp dir, atomic rename, ``latest``).
- :mod:`.metrics`: progress bar, metrics.json, loss plot.
- :mod:`.evaluation`: held-out loss by position in the sequence (CP-aware); :mod:`.passkey`: passkey retrieval;
  :mod:`.eval_report`: their log lines, summary values and plot.
- :mod:`.trainer`: the training loop on an initialised process group.
- :mod:`.report`: the banner, metrics.json and the summary of a run.
- :mod:`.launch`: how ranks start (torchrun/srun, forked CPU workers, torchrun re-exec on GPUs).

Only :mod:`.recipe` (with :mod:`.sections` and the shared validator :mod:`megatron_tasp.schema`) is imported
here; the rest imports torch and Megatron when used.
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
