"""The models ``ci/bench_e2e.py`` serves: published configs, checkpoints made here.

No model hub is reachable from the GPU machine, so every model is a
``config.json`` written from the published dimensions through transformers'
own config class. Timing uses vLLM's dummy weights on that config. The
correctness check needs real weights (dummy ones give near-uniform logits, so
every position picks the same token): ``make_checkpoint`` builds transformers'
own model class for the architecture at a few layers, initialised by its own
``_init_weights``, and saves it as safetensors, which vLLM then loads through
its normal loader.
"""

from __future__ import annotations

import json
from pathlib import Path

#: name -> what the harness needs. ``layers``: depth for timing (the full model
#: unless memory on one H200 forbids it: ``full_layers`` says what was cut);
#: ``check_layers``: depth of the small real checkpoint.
MODELS: dict[str, dict] = {
    "a2.7b": {
        "title": "Qwen1.5-MoE-A2.7B",
        "layers": 24,
        "full_layers": 24,
        "check_layers": 4,
        "config": {
            "model_type": "qwen2_moe",
            "architectures": ["Qwen2MoeForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 151936,
            "max_position_embeddings": 8192,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
        },
    },
    "57b": {
        "title": "Qwen2-57B-A14B",
        # 28 layers are ~114 GB of bf16 weights: with the KV cache and CUDA
        # graphs that does not fit one 141 GB H200 under vLLM's 0.9 budget.
        "layers": 16,
        "full_layers": 28,
        "check_layers": 2,
        "config": {
            "model_type": "qwen2_moe",
            "architectures": ["Qwen2MoeForCausalLM"],
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "moe_intermediate_size": 2560,
            "shared_expert_intermediate_size": 20480,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
        },
    },
    "30b-a3b": {
        "title": "Qwen3-30B-A3B (no shared expert: the control)",
        "layers": 48,
        "full_layers": 48,
        "check_layers": 4,
        "config": {
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-06,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
        },
    },
    "next80b": {
        "title": "Qwen3-Next-80B-A3B",
        # 48 layers are ~160 GB of bf16 weights, more than one H200 holds.
        "layers": 24,
        "full_layers": 48,
        "check_layers": 4,
        # vLLM picks FlashInfer's GDN prefill kernel on Hopper; FlashInfer is
        # not on the GPU machine, so the gated-delta-net layers use vLLM's
        # Triton/FLA kernels.
        "engine_args": {"additional_config": {"gdn_prefill_backend": "triton"}},
        "config": {
            "model_type": "qwen3_next",
            "architectures": ["Qwen3NextForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 5120,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512,
            "num_experts": 512,
            "num_experts_per_tok": 10,
            "norm_topk_prob": True,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4,
            "partial_rotary_factor": 0.25,
            "vocab_size": 151936,
            "max_position_embeddings": 262144,
            "rope_theta": 10000000.0,
            "rms_norm_eps": 1e-06,
            "decoder_sparse_step": 1,
            "tie_word_embeddings": False,
        },
    },
}


def hf_config(name: str, layers: int):
    """transformers' config object for MODELS[name] at ``layers`` layers."""
    from transformers import AutoConfig

    fields = dict(MODELS[name]["config"])
    model_type = fields.pop("model_type")
    fields["num_hidden_layers"] = layers
    fields["torch_dtype"] = "bfloat16"
    # Per-layer attention types follow the depth (Qwen3-Next: 3 linear, 1 full).
    fields.pop("layer_types", None)
    return AutoConfig.for_model(model_type, **fields)


def write_config(name: str, layers: int, out: Path) -> Path:
    """A model directory holding only ``config.json`` (for dummy weights)."""
    out.mkdir(parents=True, exist_ok=True)
    hf_config(name, layers).save_pretrained(out)
    return out


def make_checkpoint(
    name: str, out: Path, prompts: list[list[int]], max_tokens: int, seed: int
) -> dict:
    """Save a small real checkpoint of MODELS[name] (bf16), then run the same
    weights in fp32 through transformers' own forward: its greedy tokens for
    ``prompts`` and the log-probability of each of them, the reference that
    both vLLM trees are scored against."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(name, MODELS[name]["check_layers"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    model.float()
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(
                ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            new = gen[0, len(prompt) :]
            logits = model(gen).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, new[:, None])[:, 0]
            tokens.append(new.tolist())
            logprobs.append(lp.tolist())
    del model
    if device == "cuda":  # give the engines started next the memory back
        torch.cuda.empty_cache()
    meta = {"model": name, "layers": cfg.num_hidden_layers, "seed": seed}
    (out / "moepatch-checkpoint.json").write_text(json.dumps(meta))
    return {"ref_tokens": tokens, "ref_logprobs": logprobs, **meta}
