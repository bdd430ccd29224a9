//! The panel kernel's tests: every format against products computed in f64 (and i64 for
//! int8) from the values the kernel multiplies.

use super::*;

#[test]
fn row_tiles_cover_the_rows_in_even_tiles_of_at_most_six() {
    for rows in 0..40 {
        let tiles: Vec<_> = row_tiles(0..rows).collect();
        assert_eq!(tiles.iter().map(|t| t.len()).sum::<usize>(), rows);
        assert!(tiles.iter().all(|t| t.len() <= MAX_TILE_ROWS));
        let (min, max) = tiles.iter().fold((usize::MAX, 0), |(a, b), t| {
            (a.min(t.len()), b.max(t.len()))
        });
        assert!(rows == 0 || max - min <= 1, "{rows}: {tiles:?}");
    }
    assert_eq!(row_tiles(0..8).collect::<Vec<_>>(), vec![0..4, 4..8]);
    // A share of the rows (`Linear::forward` splits tall products by rows too).
    assert_eq!(row_tiles(30..38).collect::<Vec<_>>(), vec![30..34, 34..38]);
}

#[test]
fn activations_round_to_bf16_as_half_does() {
    let mut values: Vec<f32> = [0x7fff_u32, 0x8000, 0x8001, 0x1_8000, 0x1_7fff]
        .iter()
        .map(|&low| f32::from_bits(0x3f80_0000 | low))
        .collect();
    values.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        1e-40,
    ]);
    values.extend(crate::test_util::pseudo(999, 7, -1e3, 1e3));
    let mut pairs = vec![0u32; values.len().div_ceil(2)];
    bf16_pairs(&values, &mut pairs);
    for (p, v) in values.iter().enumerate() {
        let got = (pairs[p / 2] >> (16 * (p % 2))) as u16;
        let want = half::bf16::from_f32(*v).to_bits();
        assert_eq!(got, want, "{v:e} ({:#x})", v.to_bits());
    }
}

#[test]
fn a_packed_row_reads_back_as_the_torch_row() {
    let (n, k) = (70, 5);
    // Integers up to 256 are exact in bf16.
    let w: Vec<f32> = (0..n * k).map(|i| (i % 251) as f32).collect();
    let packed = PanelWeight::from_torch(&w, n, k);
    let bf16 = PanelWeight::from_torch_bf16(&w, n, k);
    let int8 = PanelWeight::from_torch_int8(&w, n, k);
    let mut row = vec![0.0; k];
    for j in [0, 63, 64, 69] {
        packed.row_f32(j, &mut row);
        assert_eq!(row, &w[j * k..(j + 1) * k]);
        bf16.row_f32(j, &mut row);
        assert_eq!(row, &w[j * k..(j + 1) * k]);
        // int8: the quads of 4 inputs (a second step of one), dequantized.
        int8.row_f32(j, &mut row);
        let torch_row = &w[j * k..(j + 1) * k];
        let scale = weight_scale(torch_row);
        let dequantized: Vec<f32> = torch_row
            .iter()
            .map(|&v| f32::from(quantize_weight(v, scale)) * scale)
            .collect();
        assert_eq!(row, dequantized);
    }
    // 64 columns, then 6 kept in one vector of 16; bf16 in 3 pairs of inputs.
    assert_eq!(packed.size_bytes(), (PANEL + 16) * k * 4);
    assert_eq!(bf16.size_bytes(), (PANEL + 16) * 3 * 4);
}

/// Against a product in f64 of the values multiplied (f32, or both sides rounded to
/// bf16): one tile and many (a `k` over several blocks and ragged, odd for bf16's pairs),
/// strided rows, a partial last panel, shares of rows and columns as the threads take them.
#[test]
fn the_kernel_matches_the_naive_product() {
    let formats = [PanelFormat::F32, PanelFormat::Bf16]
        .into_iter()
        .filter(|&f| available(f));
    // Last panels of 1 to 4 vectors (70, 100, 130 and 150 columns).
    let shapes = [
        (1, 37, 70),
        (2, 300, 100),
        (5, 301, 130),
        (7, 129, 64),
        (20, 260, 150),
        // A long `k` for shares of one tile (4 and 5 rows): one block, streamed.
        (9, 2100, 100),
        // Shares of 4 rows, tiles in halves where the CPU takes them (`half_vectors::takes`):
        // three segments and a step left over, a last panel of 2 vectors.
        (8, 769, 150),
        // bf16: 1051 pairs in blocks (shares of 6 and 7 rows), the last one's second input
        // the padding.
        (13, 2101, 70),
        // Shares of 3 tiles or more: up to `FEW_TILES`, blocks that L1 holds.
        (30, 501, 100),
        (14, 300, 100),
        // Shares of more tiles than `FEW_TILES`, in two blocks of `K_BLOCK` or less.
        (80, 1100, 70),
    ];
    for format in formats {
        for (m, k, n) in shapes {
            let stride = k + 3;
            let mut x = crate::test_util::pseudo(m * stride, 31, -1.0, 1.0);
            let mut w = crate::test_util::pseudo(n * k, 32, -1.0, 1.0);
            let b = crate::test_util::pseudo(n, 33, -1.0, 1.0);
            let packed = match format {
                PanelFormat::F32 => PanelWeight::from_torch(&w, n, k),
                PanelFormat::Bf16 => PanelWeight::from_torch_bf16(&w, n, k),
                PanelFormat::Int8 => unreachable!("int8 has its own test"),
            };
            let view = MatRef {
                data: &x,
                rows: m,
                cols: k,
                row_stride: stride,
            };
            // bf16: both kernels, on pairs and widened to f32, whichever this CPU picks.
            let inputs = match format {
                PanelFormat::Bf16 => vec![
                    ("pairs", PanelInput::bf16_pairs(view, packed.steps())),
                    ("widened", PanelInput::bf16_wide(view, packed.steps())),
                ],
                _ => vec![("", PanelInput::for_weight(view, &packed))],
            };
            // A single row: both of its walks.
            let outs: Vec<_> = inputs
                .iter()
                .flat_map(|(kind, input)| {
                    OneRowWalk::ALL.map(|walk| {
                        let out = in_shares(input, &packed, &b, m, walk);
                        (format!("{kind} {walk:?}"), out)
                    })
                })
                .collect();
            drop(inputs);
            if format == PanelFormat::Bf16 {
                // The reference multiplies the values the kernel multiplies.
                for v in x.iter_mut().chain(w.iter_mut()) {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
            }
            for (kind, out) in outs {
                let what = format!("{format:?} {kind} {m}×{k}×{n}");
                crate::test_util::assert_linear_matches_f64(
                    &out,
                    &x,
                    stride,
                    &w,
                    &b,
                    (m, k, n),
                    &what,
                );
            }
        }
    }
}

/// A product over parts of the steps (`block_steps`, a narrow row's inputs split over the
/// threads), the parts added after, against the whole product's reference: f32 and bf16
/// (pairs and widened), one row in every walk and several rows, parts that split a `k` of
/// several blocks unevenly, an empty part, the bias in one part alone.
#[test]
fn parts_of_the_steps_add_up_to_the_product() {
    let formats = [PanelFormat::F32, PanelFormat::Bf16]
        .into_iter()
        .filter(|&f| available(f));
    for format in formats {
        for (m, k, n) in [(1, 1536, 80), (1, 301, 64), (7, 2100, 130)] {
            let mut x = crate::test_util::pseudo(m * k, 51, -1.0, 1.0);
            let mut w = crate::test_util::pseudo(n * k, 52, -1.0, 1.0);
            let b = crate::test_util::pseudo(n, 53, -1.0, 1.0);
            let packed = match format {
                PanelFormat::F32 => PanelWeight::from_torch(&w, n, k),
                _ => PanelWeight::from_torch_bf16(&w, n, k),
            };
            let view = MatRef::dense(&x, m, k);
            let inputs = match format {
                PanelFormat::Bf16 => vec![
                    PanelInput::bf16_pairs(view, packed.steps()),
                    PanelInput::bf16_wide(view, packed.steps()),
                ],
                _ => vec![PanelInput::for_weight(view, &packed)],
            };
            let steps = packed.steps();
            let cuts = [0, steps / 3, steps / 3, steps - 5, steps];
            let mut outs = Vec::new();
            for input in &inputs {
                for walk in OneRowWalk::ALL {
                    let mut sum = vec![0.0f32; m * n];
                    for (p, part) in cuts.windows(2).enumerate() {
                        let mut out = vec![f32::NAN; m * n];
                        let target = Out {
                            ptr: out.as_mut_ptr(),
                            n,
                        };
                        let bias = Some(&b[..]).filter(|_| p == 0);
                        // SAFETY: the CPU runs the format; `input` was prepared for
                        // `packed`; `out` holds m × n; the steps lie in the panels.
                        unsafe {
                            block_steps(
                                input,
                                &packed,
                                bias,
                                0..m,
                                (0..n, part[0]..part[1]),
                                target,
                                walk,
                            )
                        };
                        if part[0] == part[1] {
                            // An empty part writes nothing.
                            assert!(out.iter().all(|v| v.is_nan()));
                            continue;
                        }
                        sum.iter_mut().zip(&out).for_each(|(s, v)| *s += v);
                    }
                    outs.push((format!("{format:?} {m}×{k}×{n} {walk:?}"), sum));
                }
            }
            drop(inputs);
            if format == PanelFormat::Bf16 {
                for v in x.iter_mut().chain(w.iter_mut()) {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
            }
            for (what, out) in outs {
                crate::test_util::assert_linear_matches_f64(&out, &x, k, &w, &b, (m, k, n), &what);
            }
        }
    }
}

/// Where the CPU multiplies bf16 with FMAs ([`super::bf16_by_fma`]: from 3 rows), the two
/// bf16 kernels give the same bits, `vdpbf16ps` on pairs and the FMAs on the pairs widened
/// to f32, so that a session's rows do not change with the batch they run in. Rows of 1 to
/// 13 (the widened kernel's tiles of every height) and shares of 3 tiles and more, a `k` in
/// two blocks and odd, values
/// over many magnitudes and both signs, so that sums cancel and round. (Two FMAs in the
/// other order differ in the last bit here: the test tells them apart.)
#[test]
fn bf16_by_fma_gives_vdpbf16ps_bits() {
    if !available(PanelFormat::Bf16) || !super::bf16_by_fma() {
        return;
    }
    for (m, k, n) in [
        (1, 37, 70),
        (2, 300, 100),
        (5, 301, 130),
        (6, 2101, 150),
        (13, 768, 64),
        (27, 301, 130),
        (40, 2101, 70),
    ] {
        let stride = k + 1;
        // Magnitudes 2^-20..2^20: products far apart in size, as a layer's are.
        let spread = |values: Vec<f32>, seed: usize| -> Vec<f32> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| v * 2f32.powi(((i * 7 + seed) % 41) as i32 - 20))
                .collect()
        };
        let x = spread(crate::test_util::pseudo(m * stride, 41, -1.0, 1.0), 3);
        let w = spread(crate::test_util::pseudo(n * k, 42, -1.0, 1.0), 5);
        let b = crate::test_util::pseudo(n, 43, -1.0, 1.0);
        let packed = PanelWeight::from_torch_bf16(&w, n, k);
        let view = MatRef {
            data: &x,
            rows: m,
            cols: k,
            row_stride: stride,
        };
        let pairs = PanelInput::bf16_pairs(view, packed.steps());
        let widened = PanelInput::bf16_wide(view, packed.steps());
        for walk in OneRowWalk::ALL {
            let pairs = in_shares(&pairs, &packed, &b, m, walk);
            let wide = in_shares(&widened, &packed, &b, m, walk);
            for (i, (p, q)) in pairs.iter().zip(&wide).enumerate() {
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{m}×{k}×{n} {walk:?}, output {i}: vdpbf16ps {p:e}, FMAs {q:e}"
                );
            }
        }
    }
}

/// int8 against LLM.int8's math in i64 and f64 from the quantizers' values: one row (4
/// segments summed in i32), tiles of several rows, partial last panels, a `k` of two
/// blocks (the 128-offset taken off once), outliers none, few and many, several in one
/// quad, and every column an outlier; each widened as the tiles go (up to 2 tiles in a share
/// of rows) and widened once (from 3 tiles: many outliers in several blocks of widened steps,
/// and no int8 pass where every column is one).
#[test]
fn the_int8_kernel_computes_llm_int8s_product() {
    if !available(PanelFormat::Int8) {
        return;
    }
    let every = |k: usize| (0..k).collect::<Vec<_>>();
    for (m, k, n, outliers) in [
        (1, 300, 70, vec![5usize, 6, 200]),
        (2, 70, 100, vec![0, 69]),
        (3, 64, 16, vec![]),
        (7, 301, 130, vec![33, 300]),
        (9, 130, 64, vec![1, 2, 3, 4]),
        (13, 4101, 150, vec![17, 4100]),
        (13, 70, 130, every(70)),
        (2, 70, 20, every(70)),
        (26, 300, 70, (0..300).step_by(2).collect()),
        (27, 70, 130, every(70)),
        (40, 1100, 80, every(1100)),
        (80, 4500, 70, vec![7, 4499]),
    ] {
        let outliers = &outliers[..];
        let (x, w, b, packed) = int8_case((m, k, n), outliers, 41);
        let view = MatRef::dense(&x, m, k);
        let input = PanelInput::for_weight(view, &packed);
        let PanelInput::Int8(acts) = &input else {
            unreachable!("int8 weights take int8 activations")
        };
        assert_eq!(acts.outliers(), outliers);
        let rows = crate::int8::Int8Weight::from_f32(&w, n, k);
        for walk in OneRowWalk::ALL {
            let out = in_shares(&input, &packed, &b, m, walk);
            let what = format!("int8 {m}×{k}×{n} {walk:?}");
            crate::test_util::assert_llm_int8(&out, &x, acts, &rows, &b, (m, k, n), &what);
        }
    }
}

/// An int8 case of `m × k` activations (seeded from `seed`) whose `outliers` columns hold a
/// value of LLM.int8's outlier size in one row each, `n × k` weights packed as int8, a bias.
fn int8_case(
    (m, k, n): (usize, usize, usize),
    outliers: &[usize],
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, PanelWeight) {
    let mut x = crate::test_util::pseudo(m * k, seed, -2.0, 2.0);
    for (r, &p) in outliers.iter().enumerate() {
        x[(r % m) * k + p] = if r % 2 == 0 { 7.5 } else { -6.0 };
    }
    let w = crate::test_util::pseudo(n * k, seed + 1, -0.5, 0.5);
    let b = crate::test_util::pseudo(n, seed + 2, -1.0, 1.0);
    let packed = PanelWeight::from_torch_int8(&w, n, k);
    (x, w, b, packed)
}

/// `out` (`[rows, n]`) of `packed` (whose format this CPU runs) and `input` (prepared for it),
/// with bias `b`, in four shares as the pool's threads take a tall product's: the first
/// panel and the rest of the columns, each for the first half of the rows and the second
/// (a half that starts inside a tile of six, and an empty one for a single row). A one-row
/// share's tiles walk their panels by `walk`.
fn in_shares(
    input: &PanelInput<'_>,
    packed: &PanelWeight,
    b: &[f32],
    rows: usize,
    walk: OneRowWalk,
) -> Vec<f32> {
    assert!(available(packed.format()));
    let n = packed.n;
    let mut out = vec![f32::NAN; rows * n];
    let target = Out {
        ptr: out.as_mut_ptr(),
        n,
    };
    let half = rows / 2;
    // SAFETY: the CPU runs the format (asserted); `input` was prepared for `packed`; `out`
    // holds rows × n; the shares are disjoint.
    unsafe {
        for share in [0..half, half..rows] {
            let steps = 0..packed.steps();
            block_steps(
                input,
                packed,
                Some(b),
                share.clone(),
                (0..PANEL.min(n), steps.clone()),
                target,
                walk,
            );
            if n > PANEL {
                block_steps(
                    input,
                    packed,
                    Some(b),
                    share,
                    (PANEL..n, steps),
                    target,
                    walk,
                );
            }
        }
    }
    out
}

/// bf16 on AMX tiles (`amx.rs`) against a product in f64 of the rounded values: one tile and
/// several of `k`, rows that fill no tile, one tile, part of a second or of a third (blocks of
/// two tiles and of one), columns in groups of 32 and 16 with the last panel's padding
/// past `n`, shares that start inside a tile (`in_shares`), with and without the bias.
#[test]
fn amx_tiles_match_the_naive_product() {
    if !crate::cpu::amx() {
        eprintln!("skipped: no AMX here ({})", crate::cpu::simd_level());
        return;
    }
    for (m, k, n) in [
        (16, 32, 16),
        (17, 64, 80),
        (40, 768, 150),
        (64, 96, 64),
        (33, 1536, 200),
        (16, 63, 48),
    ] {
        let x = crate::test_util::pseudo(m * k, 61, -1.0, 1.0);
        let w = crate::test_util::pseudo(n * k, 62, -1.0, 1.0);
        let packed = PanelWeight::from_torch_bf16(&w, n, k);
        let view = MatRef::dense(&x, m, k);
        let input = PanelInput::for_weight(view, &packed);
        assert!(
            matches!(input, PanelInput::Bf16Tiles { .. }),
            "{m}×{k}×{n} takes the tiles"
        );
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        let (xr, wr) = (round(&x), round(&w));
        for b in [crate::test_util::pseudo(n, 63, -1.0, 1.0), vec![0.0; n]] {
            let out = in_shares(&input, &packed, &b, m, OneRowWalk::ALL[0]);
            let what = format!("bf16 AMX {m}×{k}×{n}");
            crate::test_util::assert_linear_matches_f64(&out, &xr, k, &wr, &b, (m, k, n), &what);
        }
    }
    // Fewer rows, or a `k` that is not whole tiles, take the AVX-512 kernels.
    let w = crate::test_util::pseudo(64 * 48, 64, -1.0, 1.0);
    let x = crate::test_util::pseudo(64 * 48, 65, -1.0, 1.0);
    let packed = PanelWeight::from_torch_bf16(&w, 64, 48);
    let input = PanelInput::for_weight(MatRef::dense(&x, 64, 48), &packed);
    assert!(!matches!(input, PanelInput::Bf16Tiles { .. }));
    let packed = PanelWeight::from_torch_bf16(&w, 48, 64);
    let input = PanelInput::for_weight(MatRef::dense(&x, 15, 64), &packed);
    assert!(!matches!(input, PanelInput::Bf16Tiles { .. }));
}

/// int8 on AMX tiles against LLM.int8's math in i64 and f64, as the AVX-512 kernel's test:
/// rows that fill no tile, one, part of a second or third, partial last panels, outliers
/// none, few (widened as the tiles go and, from 3 tiles of 6, widened once), many and every
/// column, shares that start inside a tile.
#[test]
fn amx_int8_tiles_compute_llm_int8s_product() {
    if !crate::cpu::amx() {
        eprintln!("skipped: no AMX here ({})", crate::cpu::simd_level());
        return;
    }
    let every = |k: usize| (0..k).collect::<Vec<_>>();
    for (m, k, n, outliers) in [
        (16, 64, 16, vec![]),
        (17, 128, 80, vec![5usize, 100]),
        (40, 768, 150, vec![3, 700]),
        (33, 1536, 200, (0..1536).step_by(2).collect()),
        (20, 64, 70, every(64)),
        (64, 192, 64, vec![0, 191]),
    ] {
        let outliers = &outliers[..];
        let (x, w, b, packed) = int8_case((m, k, n), outliers, 71);
        let input = PanelInput::for_weight(MatRef::dense(&x, m, k), &packed);
        let PanelInput::Int8Tiles { x: acts, .. } = &input else {
            panic!("{m}×{k}×{n} takes the tiles")
        };
        assert_eq!(acts.outliers(), outliers);
        let rows = crate::int8::Int8Weight::from_f32(&w, n, k);
        let out = in_shares(&input, &packed, &b, m, OneRowWalk::ALL[0]);
        let what = format!("int8 AMX {m}×{k}×{n}");
        crate::test_util::assert_llm_int8(&out, &x, acts, &rows, &b, (m, k, n), &what);
    }
}
