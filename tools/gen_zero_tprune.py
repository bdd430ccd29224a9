"""Writes tests/fixtures/prune/zero_tprune.safetensors: cases of the Zero-TPrune pruning layer
(I' -> S -> I), computed here in numpy (float64) from ../shared/SPEC-MODELS.md section 6 and the
choices stated below, independently of Tideway's Rust (`operators/src/prune/zero_tprune.rs`),
which must reproduce the kept sets exactly and the scores within 1e-4.

Stated choices (where section 6 leaves one open; the Rust function states the same):
- Scores start uniform (1/N) and are renormalised to sum 1 after every iteration; no
  per-iteration 1/N factor. One iteration: s_j <- sum_i A_ij s_i (A row-stochastic).
- Causal graphs (Tideway's adaptation, section 6.3): A~ = rownorm(|A| * lower-triangular mask)
  (a row summing to 0 stays 0), and each token's votes are divided by its number of possible
  voters: s_j <- (sum_{i>=j} A~_ij s_i) * N / (N - j), then renormalised.
- I' (ranking for the S stage): one iteration per head, heads combined by EIR with every head
  counted (no VHF).
- S stage, "Sequential-U": the tokens that are not protected, sorted by I' ascending (ties:
  lower index first); group A = the first floor(M/2) of them (M = how many), group B = every
  other token (protected ones included). m_a = max over b in B of cos(k_a, k_b) on the keys
  (heads concatenated; a zero vector's cosine is 0). The r tokens of A with the largest m_a are
  dropped (ties: lower index first).
- I stage on the survivors: each head's graph restricted to them (rows and columns) and
  renormalised by rows (causal: A~ of the restricted graph), `iterations` iterations; VHF keeps
  head h when v_min <= Var_i(n * s_i^h) <= v_max (population variance, n survivors; the spec
  leaves the scale open: n*s makes the uniform score 1), [0.01, 0.7]; no head in range: every
  head counts; EIR s_i = sqrt(sum_h eta_h (s_i^h)^2 / sum_h eta_h).
- Kept: every protected survivor, then the highest I scores among the rest (ties: lower index
  first) up to `keep` tokens in all; returned in index order with their I scores.

    .venv/bin/python tools/gen_zero_tprune.py
"""

import json
import pathlib

import numpy as np
from safetensors.numpy import save

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "prune" / "zero_tprune.safetensors"


def prepare(a, causal):
    a = np.array(a, dtype=np.float64)
    if causal:
        a = np.tril(np.abs(a))
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def wpr(a, iterations, causal):
    n = a.shape[0]
    s = np.full(n, 1.0 / n)
    voters = n - np.arange(n)
    for _ in range(iterations):
        s = a.T @ s
        if causal:
            s = s * n / voters
        total = s.sum()
        if total > 0:
            s = s / total
    return s


def eir(per_head, eta):
    per_head = np.asarray(per_head)
    eta = np.asarray(eta, dtype=np.float64)
    if eta.sum() == 0:
        eta = np.ones_like(eta)
    return np.sqrt((eta[:, None] * per_head**2).sum(axis=0) / eta.sum())


def vhf(per_head, v_min, v_max):
    n = per_head.shape[1]
    var = (n * per_head).var(axis=1)
    return ((var >= v_min) & (var <= v_max)).astype(np.float64), var


def cosine(u, v):
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return 0.0
    return float(u @ v / (nu * nv))


def zero_tprune(graphs, keys, cfg):
    heads, n, _ = graphs.shape
    causal = cfg["causal"]
    protected = set(cfg["protected"])
    prepared = [prepare(g, causal) for g in graphs]
    i_prime = eir([wpr(a, 1, causal) for a in prepared], np.ones(heads))

    others = sorted((i for i in range(n) if i not in protected), key=lambda i: (i_prime[i], i))
    group_a = others[: len(others) // 2]
    group_b = [i for i in range(n) if i not in set(group_a)]
    similarity = {a: max(cosine(keys[a], keys[b]) for b in group_b) for a in group_a}
    by_similarity = sorted(group_a, key=lambda a: (-similarity[a], a))
    dropped = sorted(by_similarity[: cfg["drop_similar"]])

    survivors = [i for i in range(n) if i not in set(dropped)]
    sub = [prepare(np.asarray(g, dtype=np.float64)[np.ix_(survivors, survivors)], causal) for g in graphs]
    per_head = np.array([wpr(a, cfg["iterations"], causal) for a in sub])
    eta, _ = vhf(per_head, *cfg["vhf"])
    scores = eir(per_head, eta)

    kept = [i for i in range(len(survivors)) if survivors[i] in protected]
    rest = sorted(
        (i for i in range(len(survivors)) if survivors[i] not in protected),
        key=lambda i: (-scores[i], survivors[i]),
    )
    kept += rest[: max(0, cfg["keep"] - len(kept))]
    kept = sorted(kept)
    return {
        "kept": [survivors[i] for i in kept],
        "scores": [float(scores[i]) for i in kept],
        "dropped": dropped,
        "i_prime": i_prime,
        "eta": eta,
    }


def random_graphs(rng, heads, n, sharpness):
    logits = rng.normal(size=(heads, n, n)) * sharpness
    logits -= logits.max(axis=2, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=2, keepdims=True)


def random_keys(rng, n, d, clusters):
    """Keys in `clusters` groups, so that the S stage finds near-duplicates to drop."""
    centres = rng.normal(size=(clusters, d))
    which = rng.integers(0, clusters, size=n)
    return centres[which] + 0.3 * rng.normal(size=(n, d))


def main():
    rng = np.random.default_rng(20261202)
    cases = [
        # (heads, n, d, causal, iterations, keep, drop_similar, protected, sharpness)
        (3, 24, 8, False, 30, 16, 3, [0], 1.0),
        (4, 40, 12, False, 5, 20, 6, [0], 2.0),
        (2, 17, 6, False, 1, 9, 2, [0, 16], 0.5),
        (3, 32, 8, True, 3, 18, 4, [0, 29, 30, 31], 1.5),
        (4, 48, 16, True, 2, 12, 8, [0, 44, 45, 46, 47], 1.0),
        (1, 12, 4, True, 1, 12, 0, [0], 3.0),
    ]
    tensors, metadata = {}, {}
    for c, (heads, n, d, causal, iterations, keep, drop, protected, sharpness) in enumerate(cases):
        graphs = random_graphs(rng, heads, n, sharpness).astype(np.float32)
        if causal:
            # A causal layer's matrix: only j <= i is real (the rest must be ignored).
            graphs = graphs * (1.0 + 0.5 * rng.normal(size=graphs.shape)).astype(np.float32)
        keys = random_keys(rng, n, d, clusters=max(2, n // 6)).astype(np.float32)
        cfg = {
            "causal": causal,
            "iterations": iterations,
            "keep": keep,
            "drop_similar": drop,
            "protected": protected,
            "vhf": [0.01, 0.7],
        }
        got = zero_tprune(graphs, keys, cfg)
        name = f"case{c}"
        tensors[f"{name}.graphs"] = graphs
        tensors[f"{name}.keys"] = keys
        tensors[f"{name}.kept"] = np.array(got["kept"], dtype=np.int64)
        tensors[f"{name}.scores"] = np.array(got["scores"], dtype=np.float64)
        tensors[f"{name}.dropped"] = np.array(got["dropped"], dtype=np.int64)
        tensors[f"{name}.i_prime"] = np.asarray(got["i_prime"], dtype=np.float64)
        metadata[name] = json.dumps(cfg)
        print(f"{name}: n={n} heads={heads} causal={causal} kept {len(got['kept'])}, "
              f"dropped as similar {got['dropped']}, heads kept by VHF {got['eta'].tolist()}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(save(tensors, metadata=metadata))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
