"""Freeze the tiny Hugging Face checkpoints and their transformers logits used by test_hf.py.

Run with torch and transformers installed (not needed by the tests themselves):

    python tests/interop/make_fixtures.py

Writes fixtures/llama_bf16 (GQA, untied head, Llama 3 RoPE scaling, bfloat16, one file),
fixtures/qwen2_tied (q/k/v biases, tied embeddings, float32, three shards with an index),
fixtures/mixtral_bf16 (4 experts, top-2, bfloat16), fixtures/qwen2_moe_bf16 (4 experts, top-2,
a sigmoid-gated shared expert, layer 0 dense by decoder_sparse_step=2, bfloat16) and
fixtures/expected.npz (tokens and float32 logits of each, computed by transformers).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

OUT = Path(__file__).parent / "fixtures"


def randomize(model) -> None:
    """Weights ~ N(0, 0.1²), norm scales ~ 1 + N(0, 0.1²) (biases too: init leaves them 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn_like(p)
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)


def main() -> None:
    torch.manual_seed(0)
    common = dict(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    llama3_rope = {
        "rope_theta": 10000.0, "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    }  # fmt: skip
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=260, **common, tie_word_embeddings=False, rope_parameters=llama3_rope
        )
    ).eval()
    randomize(llama)
    llama = llama.to(torch.bfloat16)
    qwen = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(vocab_size=64, **common, tie_word_embeddings=True)
    ).eval()
    randomize(qwen)
    mixtral = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        )
    ).eval()  # fmt: skip
    randomize(mixtral)
    mixtral = mixtral.to(torch.bfloat16)
    qwen2_moe = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=8, shared_expert_intermediate_size=12, decoder_sparse_step=2,
            max_position_embeddings=64, rms_norm_eps=1e-5,
        )
    ).eval()  # fmt: skip
    randomize(qwen2_moe)
    qwen2_moe = qwen2_moe.to(torch.bfloat16)

    expected = {}
    rng = np.random.default_rng(0)
    for name, model, shard, tokens_shape in (
        ("llama_bf16", llama, None, (1, 10)),
        ("qwen2_tied", qwen, "10KB", (2, 12)),
        ("mixtral_bf16", mixtral, None, (2, 8)),
        ("qwen2_moe_bf16", qwen2_moe, None, (2, 8)),
    ):
        folder = OUT / name
        shutil.rmtree(folder, ignore_errors=True)
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, safe_serialization=True, **kw)
        if (folder / "generation_config.json").exists():
            os.remove(folder / "generation_config.json")
        tokens = rng.integers(0, model.config.vocab_size, tokens_shape)
        # The reference logits come from a float32 copy, as jaxllm computes in float32.
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits = ref.eval()(torch.tensor(tokens)).logits.float().numpy()
        expected[f"{name}_tokens"] = tokens.astype(np.int32)
        expected[f"{name}_logits"] = logits.astype(np.float32)
    np.savez_compressed(OUT / "expected.npz", **expected)


if __name__ == "__main__":
    main()
