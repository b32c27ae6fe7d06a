"""How many models fit one node's status ConfigMap (issue #20): the Ready entry of real models, as the agent writes
it, against the API server's 1 MiB limit.

    python bench/bench_configmap.py [--json bench/out/bench_configmap.json]

Each model is a folder holding its real ``config.json`` (or ``model_index.json``) and safetensors index with the
published total size, so OME's metadata (``config``: architecture, parameter count, context length, quantization,
the artifact's parent path) comes out of the agent's own parser (``agent/ome/modelconfig.py``) and the entry out
of its own renderer (``agent/ome/entry.py``), with the ``modelherd`` fields a Ready entry carries (node, URI, path,
revision, storage mode). Prints each entry's bytes (key + value: what the API server counts), how many such
entries fit in 1 MiB, and the worst case (253-character names, the longest a CR may have).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelherd.agent.ome.entry import render_entry  # noqa: E402
from modelherd.agent.ome.keys import configmap_key  # noqa: E402
from modelherd.agent.ome.modelconfig import parse_model_config  # noqa: E402
from modelherd.agent.ome.states import ModelStatus  # noqa: E402
from modelherd.agent.reporting.configmap import DATA_LIMIT  # noqa: E402

GiB = 1 << 30
REVISION = "5206a32e0bd3067aef1ce90f5528ade7d866253f"  # a Hub commit: 40 hex digits
NODE = "gpu-h200-node-017.us-chicago-1.oke.internal"

# config.json as published (the fields OME's parser reads, and the rest that makes them the size they are)
LLAMA_70B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 128256}
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
SDXL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

MODELS: list[tuple[str, str, dict[str, Any], str, int]] = [
    # (label, hf repo, config, its file name, published safetensors total bytes)
    ("Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B-Instruct", LLAMA_70B, "config.json", 141_107_412_992),
    ("DeepSeek-V3", "deepseek-ai/DeepSeek-V3", DEEPSEEK_V3, "config.json", 688_586_727_753),
    ("SDXL base 1.0 (diffusers)", "stabilityai/stable-diffusion-xl-base-1.0", SDXL_INDEX, "model_index.json",
     6_938_040_682),
]


def entry_bytes(folder: Path, *, name: str, repo: str, models_root: str) -> tuple[int, dict[str, Any]]:
    """(key + value bytes, the entry) of ``folder``'s Ready entry as a ClusterBaseModel ``name``."""
    key = configmap_key("ClusterBaseModel", "", name)
    dest = f"{models_root}/{repo}"
    config = parse_model_config(folder, configmap_key=key, dest=dest, sha=REVISION)
    value = render_entry(None, name=name, status=ModelStatus.READY, config=config, progress=None,
                         extra={"modelherd": {"node": NODE, "storageUri": f"hf://{repo}", "path": dest,
                                              "storageMode": "shared", "revision": REVISION}})
    return len(key.encode()) + len(value.encode()), json.loads(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bench_configmap.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, repo, config, fname, total in MODELS:
            folder = Path(tmp) / repo
            folder.mkdir(parents=True)
            (folder / fname).write_text(json.dumps(config, indent=2))
            index = {"metadata": {"total_size": total},
                     "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
            for name, root in ((repo.split("/")[1].lower()[:63], "/mnt/models"),
                               ("m" * 253, "/mnt/models/" + "p" * 200)):
                size, entry = entry_bytes(folder, name=name, repo=repo, models_root=root)
                rows.append({"model": label, "name_chars": len(name), "entry_bytes": size,
                             "fit_in_1MiB": DATA_LIMIT // size, "has_config": "config" in entry,
                             "config": entry.get("config")})
    print(f"{'model':<28} {'name':>5} {'entry bytes':>11} {'fit in 1 MiB':>12}  metadata")
    for r in rows:
        print(f"{r['model']:<28} {r['name_chars']:>5} {r['entry_bytes']:>11} {r['fit_in_1MiB']:>12}  "
              f"{'yes' if r['has_config'] else 'no'}")
    typical = max(r["entry_bytes"] for r in rows if r["name_chars"] < 100)
    worst = max(r["entry_bytes"] for r in rows)
    print(f"\nlimit {DATA_LIMIT} bytes (keys + values, the API server's check): {DATA_LIMIT // typical} models of the "
          f"largest typical entry ({typical} bytes) per node, {DATA_LIMIT // worst} in the worst case ({worst} bytes: "
          "253-character names, a 200-character path)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"limit": DATA_LIMIT, "rows": rows, "typical_max": typical, "worst": worst},
                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
