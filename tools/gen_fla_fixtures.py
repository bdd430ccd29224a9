#!/usr/bin/env python3
"""Writes the flash-linear-attention oracle fixtures under tests/fixtures/fla/ using fla's own
model classes on CPU (shared/SPEC-MODELS.md section 8: TRITON_INTERPRET=1 and a stubbed
autotuner). Each fixture: a small random checkpoint as fla saves it, and expected.safetensors
with the input ids and fla's logits. Sequences are longer than one 64-token chunk, so that
Tideway's chunkwise form crosses chunk boundaries. fla runs its `fused_recurrent` kernels
(attn_mode "fused_recurrent"): with triton 3.9's interpreter its `chunk` kernels fail on CPU
(chunk_h.py: "'int' object has no attribute 'to'"); the recurrence is the same math.
Every parameter is perturbed after init so that nothing sits at a default.

    .venv/bin/pip install -r tools/requirements.txt flash-linear-attention==0.6.0
    .venv/bin/python tools/gen_fla_fixtures.py
"""

import json
import os
import shutil
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from fla.models import (  # noqa: E402
    DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GLAConfig, GLAForCausalLM,
    LinearAttentionConfig, LinearAttentionForCausalLM, RetNetConfig, RetNetForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fla"


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                scale = max(float(p.std()), 0.05) if p.numel() > 1 else 0.1
                p.add_(0.5 * scale * noise)


FAMILIES = {
    "gla": (GLAConfig, GLAForCausalLM),
    "delta_net": (DeltaNetConfig, DeltaNetForCausalLM),
    "gated_deltanet": (GatedDeltaNetConfig, GatedDeltaNetForCausalLM),
    "retnet": (RetNetConfig, RetNetForCausalLM),
    "linear_attn": (LinearAttentionConfig, LinearAttentionForCausalLM),
}


def make(name, cfg, seq_len, seed, fuse_mlp=False, legacy_eps=False, family="gla"):
    torch.manual_seed(seed)
    config_class, model_class = FAMILIES[family]
    config = config_class(fuse_cross_entropy=False, attn_mode="fused_recurrent", **cfg)
    model = model_class(config).eval()
    perturb(model, seed + 1)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, config.vocab_size, (seq_len,), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids[None, :]).logits[0].float().contiguous()
    if fuse_mlp or legacy_eps:
        # Rewrite as checkpoints from before fla b48ca31d: one fused gate_proj [2I, D] and
        # `rms_norm_eps` in config.json.
        weights = out / "model.safetensors"
        state = load_file(str(weights))
        if fuse_mlp:
            for key in [k for k in state if k.endswith("mlp.up_proj.weight")]:
                gate = key.replace("up_proj", "gate_proj")
                state[gate] = torch.cat([state[gate], state.pop(key)], dim=0).contiguous()
        save_file(state, str(weights), metadata={"format": "pt"})
        if legacy_eps:
            conf = json.loads((out / "config.json").read_text())
            conf["rms_norm_eps"] = conf.pop("norm_eps")
            (out / "config.json").write_text(json.dumps(conf, indent=2))
    save_file({"input_ids": ids.to(torch.int64), "logits": logits}, str(out / "expected.safetensors"))
    print(f"{name}: logits {tuple(logits.shape)}, std {float(logits.std()):.3f}")


def main():
    torch.set_num_threads(1)
    linear_attention_fixtures()
    ROOT.mkdir(parents=True, exist_ok=True)
    make("gla_basic", dict(hidden_size=32, num_heads=2, expand_k=0.5, expand_v=1, num_hidden_layers=2,
                           vocab_size=50, hidden_ratio=2), seq_len=150, seed=100)
    make("gla_conv_no_gate", dict(hidden_size=24, num_heads=1, expand_k=1, expand_v=2, num_hidden_layers=2,
                                  vocab_size=40, use_short_conv=True, conv_size=3, use_output_gate=False,
                                  hidden_ratio=2), seq_len=160, seed=200)
    make("gla_kv_heads_relu_clamp", dict(hidden_size=48, num_heads=4, num_kv_heads=2, expand_k=1, expand_v=0.5,
                                         num_hidden_layers=2, vocab_size=64, feature_map="relu", clamp_min=-0.05,
                                         hidden_ratio=2), seq_len=170, seed=300)
    make("gla_legacy_fused_mlp", dict(hidden_size=32, num_heads=4, expand_k=0.5, expand_v=1, num_hidden_layers=3,
                                      vocab_size=45, hidden_ratio=2, tie_word_embeddings=True),
         seq_len=70, seed=400, fuse_mlp=True, legacy_eps=True)
    make("delta_net_basic", dict(hidden_size=32, num_heads=2, expand_k=1, expand_v=1, num_hidden_layers=2,
                                 vocab_size=50, hidden_ratio=2), seq_len=150, seed=500, family="delta_net")
    make("delta_net_relu_sum_gate_negeig", dict(hidden_size=32, num_heads=4, expand_k=0.5, expand_v=2,
                                                num_hidden_layers=2, vocab_size=48, qk_activation="relu",
                                                qk_norm="sum", use_gate=True, allow_neg_eigval=True, conv_size=2,
                                                hidden_ratio=2), seq_len=140, seed=600, family="delta_net")
    make("delta_net_elu_noconv_nobeta", dict(hidden_size=24, num_heads=1, expand_k=1, expand_v=1,
                                             num_hidden_layers=2, vocab_size=40, qk_activation="elu",
                                             use_short_conv=False, use_beta=False, hidden_ratio=2),
         seq_len=130, seed=700, family="delta_net")
    make("gated_deltanet_basic", dict(hidden_size=32, num_heads=2, head_dim=8, expand_v=2, num_hidden_layers=2,
                                      vocab_size=50, hidden_ratio=2), seq_len=150, seed=800, family="gated_deltanet")
    make("gated_deltanet_gva_nogate_negeig", dict(hidden_size=24, num_heads=1, num_v_heads=3, head_dim=6,
                                                  expand_v=1, num_hidden_layers=2, vocab_size=40, use_gate=False,
                                                  allow_neg_eigval=True, conv_size=3, hidden_ratio=2),
         seq_len=140, seed=900, family="gated_deltanet")
    make("retnet_basic", dict(hidden_size=32, num_heads=4, expand_k=1, expand_v=2, num_hidden_layers=2,
                              vocab_size=50, hidden_ratio=2), seq_len=150, seed=1000, family="retnet")
    # use_short_conv is in the config but fla's RetNet block never passes it to the layer.
    make("retnet_kv_heads_conv_ignored", dict(hidden_size=24, num_heads=2, num_kv_heads=1, expand_k=1, expand_v=1,
                                num_hidden_layers=2, vocab_size=40, use_short_conv=True, conv_size=3,
                                hidden_ratio=2), seq_len=140, seed=1100, family="retnet")


def linear_attention_fixtures():
    base = dict(num_hidden_layers=2, hidden_ratio=2)
    make("linear_attn_hadamard", dict(hidden_size=32, num_heads=2, vocab_size=50, **base),
         seq_len=150, seed=1200, family="linear_attn")
    make("linear_attn_hedgehog_normalized", dict(hidden_size=32, num_heads=4, vocab_size=48,
                                                      feature_map="hedgehog",
                                                      norm_feature_map=True, **base),
         seq_len=140, seed=1300, family="linear_attn")
    make("linear_attn_dpfp_normqk_kv", dict(hidden_size=16, num_heads=2, num_kv_heads=1, vocab_size=40,
                                            feature_map="dpfp", norm_q=True, norm_k=True, **base),
         seq_len=130, seed=1400, family="linear_attn")
    make("linear_attn_t2r", dict(hidden_size=24, num_heads=2, expand_v=2, vocab_size=40, feature_map="t2r", **base),
         seq_len=130, seed=1500, family="linear_attn")
    make("linear_attn_elu_normalized", dict(hidden_size=24, num_heads=3, vocab_size=40, feature_map="elu",
                                            norm_feature_map=True, **base),
         seq_len=130, seed=1600, family="linear_attn")


if __name__ == "__main__":
    main()
