#!/usr/bin/env python3
"""fla's GLA and DeltaNet on the CPU with fla's reference functions, measured the way
`tideway bench` measures: decode tokens/s at batch 1, 8 and 32 (after a short prompt),
prefill tokens/s for 512 tokens, peak memory.

    .venv/bin/python bench/fla_cpu_bench.py MODEL_DIR [--threads 2] [--json]
    .venv/bin/python bench/fla_cpu_bench.py --check     # the patched models against the fixtures

fla's kernels are Triton kernels; on a CPU they run only under Triton's interpreter, which is
numpy per program instance and no measure of anything. So the model classes run as fla
ships them, with each Triton-backed piece swapped for fla's own reference function or its
plain-torch equivalent:
- token mixing: `fla.ops.gla.naive.naive_recurrent_gla` and
  `fla.ops.delta_rule.naive.delta_rule_recurrence` (q and k L2-normalised first where the layer
  asks the kernel to);
- RMSNorm (with the fused residual add), the gated RMSNorm, the fused SwiGLU + down projection
  and the short convolution: torch.

`--check` runs the patched classes on tests/fixtures/fla's GLA and DeltaNet checkpoints and
compares with the logits fla's own kernels gave (expected.safetensors, from
tools/gen_fla_fixtures.py): the swap must not change the model.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import fla.layers.delta_net as fla_delta_net  # noqa: E402
import fla.layers.gla as fla_gla  # noqa: E402
import fla.modules.mlp as fla_mlp  # noqa: E402
from fla.models import DeltaNetForCausalLM, GLAForCausalLM  # noqa: E402
from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution  # noqa: E402
from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from peer_report import decode_row, finish, prefill_row, start, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def rms(x, weight, bias, eps):
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = x + residual
    y = rms(x, self.weight, getattr(self, "bias", None), self.eps)
    return (y, x) if prenorm else y


def gated_rms_norm(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = x + residual
    y = rms(x, self.weight, getattr(self, "bias", None), self.eps)
    gate = F.silu(g) if self.activation in ("swish", "silu") else torch.sigmoid(g)
    y = y * gate
    return (y, x) if prenorm else y


def short_conv(self, x, residual=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
    """Depthwise causal conv over [B, T, D]; the cache holds the last W inputs ([B, D, W])."""
    b, _, d = x.shape
    w = self.kernel_size[0]
    if cache is None:
        cache = x.new_zeros(b, d, w)
    window = torch.cat([cache[:, :, 1:], x.transpose(1, 2)], dim=2)
    y = F.conv1d(window, self.weight, self.bias, groups=d).transpose(1, 2)
    if self.activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual
    return y, (window[:, :, -w:] if output_final_state else None)


def gla_mix(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **_):
    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)


def delta_mix(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **_):
    if use_qk_l2norm_in_kernel:
        # fla's l2norm_fwd: x / sqrt(Σx² + 1e-6).
        q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    o, state = delta_rule_recurrence(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2),
        initial_state, output_final_state,
    )
    return o.transpose(1, 2), state


def patch():
    RMSNorm.forward = rms_norm
    FusedRMSNormGated.forward = gated_rms_norm
    ShortConvolution.forward = short_conv
    fla_mlp.SwiGLULinear.forward = lambda self, x, y, weight, bias: F.linear(F.silu(x) * y, weight, bias)
    fla_gla.fused_recurrent_gla = gla_mix
    fla_gla.chunk_gla = gla_mix
    fla_gla.fused_chunk_gla = gla_mix
    fla_delta_net.fused_recurrent_delta_rule = delta_mix
    fla_delta_net.chunk_delta_rule = delta_mix


def load(model_dir):
    family = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    cls = {"gla": GLAForCausalLM, "delta_net": DeltaNetForCausalLM}[family]
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def check():
    from safetensors.torch import load_file

    worst = 0.0
    for case in sorted((ROOT / "tests/fixtures/fla").iterdir()):
        # gla_legacy_fused_mlp is a checkpoint of an older fla that today's classes no longer
        # load (Tideway reads it; see tools/gen_fla_fixtures.py).
        if not case.name.startswith(("gla_", "delta_net_")) or "legacy" in case.name:
            continue
        model = load(case)
        expected = load_file(str(case / "expected.safetensors"))
        ids = expected["input_ids"].long()[None, :]
        with torch.inference_mode():
            whole = model(input_ids=ids).logits[0]
            # The decode path: a prompt, then one token at a time through the cache.
            out = model(input_ids=ids[:, :5], use_cache=True)
            steps, cache = [out.logits[0]], out.past_key_values
            for t in range(5, ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits[0])
                cache = out.past_key_values
            stepped = torch.cat(steps)
        want = expected["logits"]
        for name, got in (("whole", whole), ("stepped", stepped)):
            err = float((got - want).abs().max() / want.abs().max())
            worst = max(worst, err)
            print(f"{case.name:<32} {name:<8} max relative error {err:.2e}")
    print(f"worst {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


def bench(args):
    report, g = start(args)
    model = load(args.model)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            prompt = torch.randint(0, vocab, (batch, 12), generator=g)
            out = model(input_ids=prompt, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)

            def step():
                nonlocal cache, token
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

            step()
            decode_row(report, batch, timed(step, args.steps), args.json)
        ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=g)
        model(input_ids=ids[:, :16])
        prefill_row(report, args.prefill_tokens, timed(lambda: model(input_ids=ids), 2), args.json)
    finish(report, args.json)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=9, help="decode steps timed (median) per batch size")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    patch()
    if args.check:
        return check()
    if not args.model:
        ap.error("MODEL_DIR or --check")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
