"""model.rope_scaling on Megatron-Core: the q and k that a GPTModel built by the fine-tuning app hands to core
attention (after RoPE, YaRN's attention factor included) equal Hugging Face's Llama RoPE of the same
rope_parameters applied to the same q and k; the scaled model runs forward, also at CP=2 (zigzag slices of
the scaled tables give the CP=1 logits). The comparisons with Hugging Face are skipped where transformers is
not installed; the rest runs on every megatron-core version.

Tolerance (fp32): rtol 1e-6 on the frequencies, 1e-5 of max|q| on q and k. none, llama3 and yarn compute the
same frequencies and angles as Hugging Face (bit-equal on megatron-core 0.16.1 and 0.19.2). linear divides
the positions by the factor where Hugging Face divides the frequencies, so an angle differs by about one
fp32 ulp of itself (up to ~1e-5 rad at position 255): measured 4.5e-6 of max|q|.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.megatron_helpers import cp_slice, import_megatron, require_megatron, zigzag_positions

require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.apps.finetune_lib.recipe import RecipeError, recipe_from_dict  # noqa: E402
from megatron_tasp.launch import run_workers  # noqa: E402

THETA = 500000.0
HEAD_DIM = 64
SEQ = 256
CASES: dict[str, dict] = {
    "none": {"rope_type": "none"},
    "linear": {"rope_type": "linear", "factor": 3.0},
    "llama3.1": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    # Not the values GPTModel(rope_scaling=True) fixes (low 1, high 4, original 8192).
    "llama3-other": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                     "original_max_position_embeddings": 2048},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 24.0,
                    "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False},
}


def _raw(rope_scaling: dict, cp: int = 1) -> dict:
    return {"model": {"num_layers": 1, "hidden_size": 4 * HEAD_DIM, "num_attention_heads": 4, "num_query_groups": 2,
                      "ffn_hidden_size": 128, "vocab_size": 256, "rotary_base": THETA,
                      "rope_scaling": copy.deepcopy(rope_scaling)},
            "data": {"seq_length": SEQ}, "parallel": {"cp": cp, "device": "cpu"}, "train": {"steps": 1}}


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _build(rope_scaling: dict, cp: int):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_tasp.apps.finetune_lib.model import build_model, transformer_config

    model_parallel_cuda_manual_seed(11)
    torch.manual_seed(11)
    recipe = recipe_from_dict(_raw(rope_scaling, cp))
    config = transformer_config(recipe, torch.device("cpu"))
    return build_model(recipe, config, 256, torch.device("cpu"))[1]


def _run(core) -> dict:
    """Forward of ``core``: q/k before RoPE, q/k as core attention receives them, the frequencies, the logits."""
    attn = core.decoder.layers[0].self_attention
    seen: dict[str, torch.Tensor] = {}

    def attn_in(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    def core_in(mod, args, kwargs):
        for i, key in enumerate(("query", "key")):
            seen[key] = args[i] if len(args) > i else kwargs[key]

    attn.register_forward_pre_hook(attn_in, with_kwargs=True)
    attn.core_attention.register_forward_pre_hook(core_in, with_kwargs=True)
    with torch.no_grad():
        logits = core(input_ids=_tokens(), position_ids=torch.arange(SEQ).expand(2, SEQ), attention_mask=None)
        q0, k0 = attn.get_query_key_value_tensors(seen["hidden"], None)[:2]
        emb = core.rotary_pos_emb(2)
    emb = emb[0] if isinstance(emb, tuple) else emb                     # yarn returns (emb, mscale)
    return {"q0": q0, "k0": k0, "q": seen["query"], "k": seen["key"], "logits": logits,
            "inv_freq": emb[1, 0, 0, :HEAD_DIM // 2].clone(), "type": type(core.rotary_pos_emb).__name__}


def _capture_worker(rank: int, world: int) -> dict:
    """CP=1: :func:`_run` of every case."""
    import_megatron()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    try:
        return {name: _run(_build(rs, 1)) for name, rs in CASES.items()}
    finally:
        parallel_state.destroy_model_parallel()


def _cp_worker(rank: int, world: int, names: list[str]) -> dict:
    """CP=world: logits of this rank's zigzag slice, per case."""
    import_megatron()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    try:
        out = {}
        group = parallel_state.get_context_parallel_group()
        for name in names:
            core = _build(CASES[name], world)
            batch = cp_slice({"tokens": _tokens(), "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous()},
                             group)
            with torch.no_grad():
                out[name] = core(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def megatron_runs() -> dict:
    return run_workers(_capture_worker, 1, timeout_s=300)[0]


def _hf(name: str):
    """Hugging Face's Llama rotary embedding of the same RoPE, and its apply_rotary_pos_emb."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = dict(CASES[name])
    params["rope_type"] = "default" if params["rope_type"] == "none" else params["rope_type"]
    params["rope_theta"] = THETA
    longest = params.get("original_max_position_embeddings", SEQ) * params.get("factor", 1.0)
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=int(longest), rope_parameters=params)
    return LlamaRotaryEmbedding(config), apply_rotary_pos_emb


@pytest.mark.parametrize("name", list(CASES))
def test_rotated_qk_match_hugging_face(megatron_runs, name):
    run = megatron_runs[name]
    rotary, apply = _hf(name)
    assert run["type"] == ("YarnRotaryEmbedding" if name.startswith("yarn") else "RotaryEmbedding")
    # The frequencies (for linear: positions / factor, i.e. frequency / factor).
    torch.testing.assert_close(run["inv_freq"], rotary.inv_freq, rtol=1e-6, atol=0)
    # The case reaches every regime of its scaling: kept, fully scaled and blended frequencies.
    base = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ratio = rotary.inv_freq.double() / base
    factor = CASES[name].get("factor", 1.0)
    kept, scaled = (ratio - 1).abs() < 1e-6, (ratio * factor - 1).abs() < 1e-6
    if CASES[name]["rope_type"] in ("llama3", "yarn"):
        assert kept.any() and scaled.any() and not (kept | scaled).all(), ratio
    # q and k as core attention receives them vs Hugging Face's rotation of the same pre-RoPE q and k.
    q0, k0 = (t.permute(1, 2, 0, 3) for t in (run["q0"], run["k0"]))   # [s, b, h, d] -> [b, h, s, d]
    cos, sin = rotary(q0, torch.arange(SEQ)[None].expand(2, SEQ))
    q_hf, k_hf = apply(q0, k0, cos, sin)
    for got, want in ((run["q"], q_hf), (run["k"], k_hf)):
        got = got.permute(1, 2, 0, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert torch.isfinite(run["logits"]).all() and run["logits"].shape == (2, SEQ, 256)


@pytest.mark.parametrize("name", ["yarn", "yarn-mscale"])
def test_yarn_attention_factor_scales_q_and_k(megatron_runs, name):
    """GPTModel's yarn path drops the factor YarnRotaryEmbedding returns; Megatron's Attention applies it to q and
    k (RoPE preserves norms, so |q| / |q before RoPE| is the factor). Hugging Face's rule: (0.1 mscale ln s + 1)
    / (0.1 mscale_all_dim ln s + 1) with both given, else 0.1 ln s + 1."""
    case, run = CASES[name], megatron_runs[name]
    m = lambda k: 0.1 * k * math.log(case["factor"]) + 1.0
    want = m(case["mscale"]) / m(case["mscale_all_dim"]) if "mscale" in case else m(1.0)
    assert want > 1.03
    for got, before in ((run["q"], run["q0"]), (run["k"], run["k0"])):
        assert abs(float(got.norm() / before.norm()) - want) < 1e-5


def test_scaling_changes_the_model(megatron_runs):
    """Each kind changes the logits of the same weights (the scaling reaches the forward)."""
    plain = megatron_runs["none"]["logits"]
    for name in CASES:
        if name != "none":
            assert (megatron_runs[name]["logits"] - plain).abs().max() > 1e-4, name


def test_cp2_slices_the_scaled_tables(megatron_runs):
    """At CP=2 (TASP) every rank's zigzag logits equal the CP=1 logits of those tokens."""
    names = ["linear", "llama3-other", "yarn-mscale"]
    parts = run_workers(_cp_worker, 2, names, timeout_s=300)
    for name in names:
        full = torch.empty_like(megatron_runs[name]["logits"])
        for rank, part in enumerate(parts):
            full[:, zigzag_positions(rank, 2, part[name].shape[1])] = part[name]
        torch.testing.assert_close(full, megatron_runs[name]["logits"], rtol=1e-4, atol=1e-4)


def test_missing_megatron_pieces_fail_closed(monkeypatch):
    """A megatron-core without the piece a kind relies on stops the build with one line, before any model."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import attention

    from megatron_tasp.apps.finetune_lib.model import check_rope_support
    from megatron_tasp.apps.finetune_lib.rope import megatron_rope

    yarn, llama = (recipe_from_dict(_raw(CASES[name]), source="r.yaml") for name in ("yarn", "llama3-other"))
    for recipe in (yarn, llama):
        check_rope_support(recipe, megatron_rope(recipe.model))  # the installed megatron-core serves both
    monkeypatch.delattr(attention, "_yarn_get_concentration_factor_from_config")
    with pytest.raises(RecipeError, match=r"^r\.yaml: model\.rope_scaling: rope_type yarn is not served by "
                                          r"megatron-core .*; upgrade megatron-core or set rope_type: none$"):
        check_rope_support(yarn, megatron_rope(yarn.model))
    monkeypatch.setattr(RotaryEmbedding, "_apply_scaling", lambda self, freqs, factor=8: freqs)  # factor only
    with pytest.raises(RecipeError, match="rope_type llama3 is not served by megatron-core"):
        check_rope_support(llama, megatron_rope(llama.model))
