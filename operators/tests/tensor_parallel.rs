//! Tensor parallelism: GatedMLP shards (gate/up column-parallel, down row-parallel) on
//! threads, summed with the in-process all-reduce or the TCP ring, equal the unsharded MLP;
//! each rank holds 1/tp of its weights.

use std::path::PathBuf;

use tideway_kernels::collective::{Collective, TcpRank, ThreadGroup};
use tideway_operators::checkpoint::Checkpoint;
use tideway_operators::layers::mlp::{GatedMlp, default_intermediate};

#[test]
fn mlp_shards_summed_across_threads_equal_the_whole_mlp() {
    // gla_legacy_fused_mlp stores the pre-2025 fused gate_proj [2I, D].
    for fixture in ["gla_basic", "gla_legacy_fused_mlp"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/fla")
            .join(fixture);
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let (hidden, intermediate) = (32, default_intermediate(32, 2));
        let prefix = "model.layers.1.mlp.";
        let whole = GatedMlp::load(&checkpoint, prefix, hidden, intermediate).unwrap();
        let m = 7;
        let x: Vec<f32> = (0..m * hidden)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut want = vec![0.0f32; m * hidden];
        whole.forward(&x, m, &mut want);
        for (tp, tcp) in [(2usize, false), (4, false), (2, true), (4, true)] {
            if !intermediate.is_multiple_of(tp) {
                continue;
            }
            let members: Vec<Box<dyn Collective>> = if tcp {
                tcp_members(tp)
            } else {
                ThreadGroup::new(tp)
                    .members()
                    .into_iter()
                    .map(|m| Box::new(m) as Box<dyn Collective>)
                    .collect()
            };
            let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
                let handles: Vec<_> = members
                    .into_iter()
                    .map(|mut member| {
                        let (checkpoint, x) = (&checkpoint, &x);
                        scope.spawn(move || {
                            let shard = GatedMlp::load_shard(
                                checkpoint,
                                prefix,
                                hidden,
                                intermediate,
                                member.rank(),
                                tp,
                            )
                            .unwrap();
                            assert_eq!(shard.size_bytes() * tp, whole_size(hidden, intermediate));
                            let mut partial = vec![0.0f32; m * hidden];
                            shard.forward(x, m, &mut partial);
                            member.all_reduce_sum(partial).wait().unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for got in outputs {
                let diff: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
                let rel = (diff / norm).sqrt();
                assert!(rel <= 1e-5, "{fixture} tp {tp}: relative error {rel:.3e}");
            }
        }
    }
}

/// A TCP ring on loopback, one rank per member.
fn tcp_members(size: usize) -> Vec<Box<dyn Collective>> {
    let listeners: Vec<std::net::TcpListener> = (0..size)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<std::net::SocketAddr> =
        listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || TcpRank::connect(rank, l, &peers).unwrap())
        })
        .collect();
    handles
        .into_iter()
        .map(|h| Box::new(h.join().unwrap()) as Box<dyn Collective>)
        .collect()
}

/// Bytes of the whole MLP's three f32 weights.
fn whole_size(hidden: usize, intermediate: usize) -> usize {
    3 * 4 * hidden * intermediate
}
