//! End-to-end test of a cluster that loses a process: three `tideway serve` processes on
//! loopback under `tideway supervise`, sessions on all of them, `kill -9` of one. The others
//! exit by themselves (timely cannot go on without a peer; none hangs), the supervisor starts
//! all three again, they re-form the cluster from `--hosts` and restore their sessions from
//! `--store`, and every client that resends from the chunk its session reports loses nothing.

mod common;

use std::time::{Duration, Instant};

use common::sessions::*;
use common::*;

/// A port prefix P such that P0, P1 and P2 are free (the gRPC ports of processes 0..3,
/// given to the supervisor as `127.0.0.1:P{process}`).
fn free_port_prefix() -> u16 {
    let mut seed = std::process::id() as u64;
    loop {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let prefix = 2000 + (seed >> 33) as u16 % 4000;
        if (0..3).all(|p| std::net::TcpListener::bind(("127.0.0.1", prefix * 10 + p)).is_ok()) {
            return prefix;
        }
    }
}

fn log_lines(path: &std::path::Path, start: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(start))
        .map(String::from)
        .collect()
}

fn wait_for(path: &std::path::Path, start: &str, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while log_lines(path, start).len() < count {
        assert!(
            Instant::now() < deadline,
            "waited for {count} lines {start:?}:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_that_loses_a_process_comes_back_with_every_session() {
    const CHUNKS: usize = 30;
    let plans: Vec<Plan> = (0..15).map(|i| plan(i + 300, CHUNKS)).collect();
    let refs = references(&plans).await;

    let dir = scratch_dir("cluster-recovery");
    let hosts = hosts_file(&dir, 3);
    let prefix = free_port_prefix();
    let log = dir.join("supervise.log");
    let mut args = vec![
        "supervise".to_string(),
        "--hosts".into(),
        hosts.display().to_string(),
        "--".into(),
        "--listen".into(),
        format!("127.0.0.1:{prefix}{{process}}"),
        "--store".into(),
        dir.join("store").display().to_string(),
        "--snapshot-every-s".into(),
        "0.2".into(),
    ];
    args.extend(model_args());
    let mut supervisor = Supervisor(
        tideway()
            .args(&args)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for(&log, "tideway listening on", 3, Duration::from_secs(60));
    let urls: Vec<String> = (0..3)
        .map(|p| format!("http://127.0.0.1:{prefix}{p}"))
        .collect();

    // Sessions on every process's gRPC port (each routed to its owner).
    let runs: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (url, p) = (urls[i % 3].clone(), p.clone());
            tokio::spawn(async move {
                drive(
                    &url,
                    keep_start(p.model),
                    &p.chunks[..CHUNKS - 1],
                    Duration::from_millis(40),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let pid = log_lines(&log, "tideway supervise: started process 1 (pid ")[0]
        .trim_start_matches("tideway supervise: started process 1 (pid ")
        .trim_end_matches(')')
        .to_string();
    let killed = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut ids = Vec::new();
    for run in runs {
        let d = run.await.unwrap();
        assert!(d.error.is_some(), "a stream outlived its process");
        ids.push(d.opened.session_id.clone());
    }
    // The cluster is back: three more processes listening, having restored every session.
    wait_for(&log, "tideway listening on", 6, Duration::from_secs(60));
    let recovered = killed.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    for p in [0, 2] {
        assert!(
            text.contains(&format!("process {p} exited (exit code 101)")),
            "process {p} did not exit by itself:\n{text}"
        );
    }
    assert!(!text.contains("lingers"), "{text}");
    let restored: usize = log_lines(&log, "tideway: restored ")
        .iter()
        .map(|l| {
            l.trim_start_matches("tideway: restored ")
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(restored, plans.len(), "{text}");

    let from = resume_all(&urls[1], &plans, &ids, &refs).await;
    assert!(
        from.iter().all(|&f| f > 0),
        "every session had a snapshot: {from:?}"
    );
    eprintln!(
        "cluster of 3 back {:.0} ms after the kill with {restored} sessions; resumed from chunks {from:?}",
        recovered.as_secs_f64() * 1e3
    );

    // SIGTERM stops the supervisor and its cluster.
    assert!(supervisor.stop(), "the supervisor did not stop");
}

/// The supervisor, stopped with its cluster however the test ends: a failed assertion must
/// not leave its processes running (they hold the test's output open and spin).
struct Supervisor(std::process::Child);

impl Supervisor {
    /// SIGTERM, then up to 30 s for the supervisor to stop its cluster and exit; whether it
    /// did.
    fn stop(&mut self) -> bool {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() && !self.stop() {
            let _ = self.0.kill();
        }
    }
}
