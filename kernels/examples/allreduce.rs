//! Time of one all-reduce-sum across a tensor-parallel group of 2, in-process threads vs the
//! TCP ring on loopback, at the sizes a 768-wide model reduces per layer (one decode row, a
//! batch of 32 rows, a 512-row prefill chunk):
//! `cargo run --release -p tideway-kernels --example allreduce`.

use std::time::Instant;

use tideway_kernels::collective::{Collective, TcpRank, ThreadGroup};

fn time_group(members: Vec<Box<dyn Collective>>, len: usize, reps: usize) -> f64 {
    let handles: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            std::thread::spawn(move || {
                let data = vec![1.0f32; len];
                for _ in 0..10 {
                    m.all_reduce_sum(data.clone()).wait().unwrap();
                }
                let t0 = Instant::now();
                for _ in 0..reps {
                    m.all_reduce_sum(data.clone()).wait().unwrap();
                }
                t0.elapsed().as_secs_f64() / reps as f64
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold(0.0, f64::max)
}

fn tcp(size: usize) -> Vec<Box<dyn Collective>> {
    let listeners: Vec<_> = (0..size)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || TcpRank::connect(r, l, &peers).unwrap())
        })
        .collect();
    handles
        .into_iter()
        .map(|h| Box::new(h.join().unwrap()) as Box<dyn Collective>)
        .collect()
}

fn main() {
    for rows in [1usize, 32, 512] {
        let len = rows * 768;
        let reps = (200_000 / len).clamp(20, 2000);
        let threads: Vec<Box<dyn Collective>> = ThreadGroup::new(2)
            .members()
            .into_iter()
            .map(|m| Box::new(m) as Box<dyn Collective>)
            .collect();
        let t = time_group(threads, len, reps);
        let n = time_group(tcp(2), len, reps);
        println!(
            "tp 2, {rows:>3} x 768 f32 ({:>7.1} KiB): threads {:>8.1} µs, TCP loopback {:>8.1} µs",
            len as f64 * 4.0 / 1024.0,
            t * 1e6,
            n * 1e6
        );
    }
}
