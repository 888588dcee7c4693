"""Per-family data for the tiny checkpoints: configs, and where each family's
attention takes its queries.

Each config is small but exercises what makes its family different
(shared experts, group-limited routing, dense first layers, correction
biases, unnormalised top-k). The Hugging Face names are in ``expertmesh.layouts``.
"""

from typing import Any, Dict

import mlx.nn as nn

SHARED = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}

# DeepSeek multi-head latent attention, shrunk
_MLA = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
}

DEFAULT_CONFIGS: Dict[str, Dict[str, Any]] = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **SHARED,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_experts": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **SHARED,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 96,
        "num_experts": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-6,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **SHARED,
        "intermediate_size": 64,
        "num_local_experts": 8,
        "rms_norm_eps": 1e-5,
    },
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        **SHARED,
        **_MLA,
        "num_experts_per_tok": 3,
        "n_shared_experts": 2,
        "q_lora_rank": None,  # like DeepSeek-V2-Lite
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": False,
        "rope_scaling": {
            "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        },
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **SHARED,
        **_MLA,
        "n_shared_experts": 1,
        "q_lora_rank": 64,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    },
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        **SHARED,
        "intermediate_size": 64,
        "num_experts": 8,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-5,
    },
}

def sharpen(attn: nn.Module, factor: float) -> None:
    """Scale an mlx-lm attention's queries, so its scores, by ``factor``:
    after the query norm where the family has one (Qwen3, OLMoE), else in
    the last query projection (DeepSeek's low-rank ``q_b_proj`` or ``q_proj``)."""
    if "q_norm" in attn:
        attn.q_norm.weight = attn.q_norm.weight * factor
        return
    q = attn.q_b_proj if "q_b_proj" in attn else attn.q_proj
    q.weight = q.weight * factor
    if "bias" in q:
        q.bias = q.bias * factor
