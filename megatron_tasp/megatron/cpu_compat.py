"""Make Megatron-Core's GPTModel run on a CPU-only machine with gloo (tests, CPU fine-tuning).

Call :func:`enable_cpu_megatron` **before** ``import megatron.core``: on a machine without CUDA it

1. seeds ``sys.modules`` with a stand-in for ``megatron.core.transformer.moe.ops.paged_stash`` when
   Triton is not installed (megatron-core >= 0.19 imports Triton unconditionally through it; the
   MoE paged-stash kernels are CUDA-only and never run on CPU; calling them raises);
2. imports ``megatron.core`` and installs four small shims for the places that hard-code CUDA:

   * model-parallel RNG seeding: ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
     Megatron's ``_get_cuda_rng_state/_set_cuda_rng_state`` use the CPU generator, so
     ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work (note:
     ``model_parallel_cuda_manual_seed(seed)`` then also reseeds the CPU generator, as it reseeds the
     default CUDA generator on a GPU);
   * ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (used by RoPE to place
     ``inv_freq``);
   * the default causal / sliding-window masks of Megatron's softmax are created on the CPU;
   * RoPE's context-parallel slicing (``get_pos_emb_on_this_cp_rank``) indexes on the embedding's
     own device instead of a pinned-memory ``.cuda()`` copy.

On a machine with CUDA it does nothing. It is idempotent. Megatron's DDP and
``get_megatron_optimizer`` still need CUDA: on CPU use ``torch.optim`` and reduce gradients yourself,
and keep dropout at 0.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from typing import Any

PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"

_SHIMS_INSTALLED = False
_SHIM_MARK = "_megatron_tasp_cpu_shim"


class _TritonKernelUnavailable:
    """Stand-in for a Triton kernel: any launch raises a clear error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{self.name} is a Triton/CUDA kernel (MoE paged stash) and is unavailable on this CPU-only "
            "machine (megatron_tasp.megatron.cpu_compat installed a stand-in); install triton and use a GPU")

    __call__ = _fail

    def __getitem__(self, grid: Any) -> Any:
        return self._fail


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def install_paged_stash_stand_in() -> bool:
    """Seed the Triton-only paged-stash module with a stand-in if Triton is missing.

    Must run before ``megatron.core`` is imported. Returns True if the stand-in was installed now.
    """
    if PAGED_STASH_MODULE in sys.modules or importlib.util.find_spec("triton") is not None:
        return False
    mod = types.ModuleType(PAGED_STASH_MODULE)
    mod.__doc__ = "CPU stand-in installed by megatron_tasp.megatron.cpu_compat (Triton is not installed)."
    mod.GLOBAL_BLOCK_SIZE = 1024
    mod.paged_stash_copy_kernel = _TritonKernelUnavailable("paged_stash_copy_kernel")
    mod.paged_stash_pop_kernel = _TritonKernelUnavailable("paged_stash_pop_kernel")
    mod.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    setattr(mod, _SHIM_MARK, True)
    sys.modules[PAGED_STASH_MODULE] = mod
    return True


def prepare_megatron_import() -> None:
    """Before megatron.core is first imported on a CPU machine without Triton, install the stand-in only.

    Product modules that import megatron.core call this first, so ``import megatron_tasp.megatron.spec``
    works on CPU even before :func:`enable_cpu_megatron`. No-op with CUDA or once megatron.core is loaded.
    """
    if "megatron.core" in sys.modules or _cuda_available():
        return
    install_paged_stash_stand_in()


# ----------------------------------------------------------------------------------------------------------
# Shim implementations (our own code; small on purpose).
# ----------------------------------------------------------------------------------------------------------

def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> Any:
    import torch

    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: Any, device: Any = -1, graph_safe: bool = False) -> None:
    import torch

    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    import torch

    torch.manual_seed(int(seed))


def _cpu_current_device() -> Any:
    import torch

    return torch.device("cpu")


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> Any:
    """Upper-triangular (True = masked) causal mask on the CPU."""
    import torch

    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> Any:
    """Sliding-window causal mask (True = masked) on the CPU, bottom-right aligned like Megatron's."""
    import torch

    q = torch.arange(sq).view(-1, 1) + (skv - sq)
    k = torch.arange(skv).view(1, -1)
    visible = (k <= q + window_size[1]) & (k >= q - window_size[0])
    return ~visible


def _cpu_pos_emb_on_this_cp_rank(pos_emb: Any, seq_dim: int, cp_group: Any) -> Any:
    """Select this CP rank's zigzag chunks [r, 2*cp-1-r] of a position embedding (any device)."""
    import torch

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=pos_emb.device)
    shape = pos_emb.shape
    chunked = pos_emb.view(*shape[:seq_dim], 2 * cp_size, -1, *shape[seq_dim + 1:])
    picked = chunked.index_select(seq_dim, idx)
    return picked.reshape(*shape[:seq_dim], -1, *shape[seq_dim + 1:])


for _f in (_cpu_get_rng_state, _cpu_set_rng_state, _cpu_manual_seed, _cpu_current_device,
           _cpu_default_causal_mask, _cpu_sliding_window_causal_mask, _cpu_pos_emb_on_this_cp_rank):
    setattr(_f, _SHIM_MARK, True)


def _replace_everywhere(name: str, original: Any, replacement: Any) -> int:
    """Rebind ``name`` in every loaded megatron module that imported ``original`` by name."""
    count = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron."):
            continue
        if getattr(mod, name, None) is original:
            setattr(mod, name, replacement)
            count += 1
    return count


def _install_shims() -> None:
    import torch

    # Import the modules that carry the CUDA-only helpers (this also imports megatron.core).
    try:
        import megatron.core  # noqa: F401
        import megatron.core.fusions.fused_softmax  # noqa: F401
        import megatron.core.models.common.embeddings.rope_utils as rope_utils
        import megatron.core.models.common.embeddings.rotary_pos_embedding  # noqa: F401
        import megatron.core.tensor_parallel.random as mrandom
        import megatron.core.transformer.utils as tutils
    except ModuleNotFoundError as exc:
        if exc.name == "triton":
            raise ImportError(
                "megatron.core needs triton; call megatron_tasp.megatron.cpu_compat.enable_cpu_megatron() "
                "before the first 'import megatron.core' (or install triton)") from exc
        raise
    for extra in ("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",):
        try:
            importlib.import_module(extra)
        except ImportError:
            pass

    # (1) model-parallel RNG seeding without CUDA.
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    # (2) torch.cuda.current_device() (RoPE's inv_freq placement).
    torch.cuda.current_device = _cpu_current_device
    # (3) default causal / sliding-window masks created on "cuda".
    for name, repl in (("get_default_causal_mask", _cpu_default_causal_mask),
                       ("get_sliding_window_causal_mask", _cpu_sliding_window_causal_mask)):
        original = getattr(tutils, name, None)
        if original is not None and not getattr(original, _SHIM_MARK, False):
            _replace_everywhere(name, original, repl)
    # (4) RoPE's CP slicing with pin_memory + .cuda().
    original = getattr(rope_utils, "get_pos_emb_on_this_cp_rank", None)
    if original is not None and not getattr(original, _SHIM_MARK, False):
        _replace_everywhere("get_pos_emb_on_this_cp_rank", original, _cpu_pos_emb_on_this_cp_rank)


def cpu_shims_active() -> bool:
    """Whether :func:`enable_cpu_megatron` has installed the shims in this process."""
    return _SHIMS_INSTALLED


def enable_cpu_megatron() -> bool:
    """Make ``megatron.core`` usable on a CPU-only machine; no-op when CUDA is available.

    Call it before the first ``import megatron.core``. Idempotent. Returns True when the CPU shims
    are active after the call, False on a CUDA machine.
    """
    global _SHIMS_INSTALLED
    if _SHIMS_INSTALLED:
        return True
    if _cuda_available():
        return False
    install_paged_stash_stand_in()
    _install_shims()
    _SHIMS_INSTALLED = True
    return True


__all__ = ["PAGED_STASH_MODULE", "cpu_shims_active", "enable_cpu_megatron", "install_paged_stash_stand_in",
           "prepare_megatron_import"]
