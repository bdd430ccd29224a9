//! End-to-end test of live migration: a cluster of two `tideway serve` processes (two workers
//! each) with rebalancing on, serving streams of three model families that send their chunks
//! without waiting for answers. One process is drained while they run: its sessions move to
//! the other process's workers; it is undrained and the rebalancer moves sessions back. Every
//! stream's answers equal an uninterrupted run's, chunk for chunk: no chunk lost, repeated or
//! reordered across the moves.

mod common;

use std::time::{Duration, Instant};

use common::sessions::*;
use common::*;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// A stream whose chunks go out every `pause` without waiting for answers (up to the
/// stream's credit in flight); returns each chunk's output rows, in the order answered.
async fn pipelined(url: String, plan: Plan, pause: Duration) -> Result<Vec<Vec<f64>>, String> {
    let mut client = pb::streams_client::StreamsClient::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(64);
    tx.send(start(plan.model, "", Vec::new())).await.unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let sender = tokio::spawn(async move {
        for c in plan.chunks {
            if tx.send(c).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    let mut outputs = Vec::new();
    while let Some(message) = inbound.next().await {
        match message.map_err(|e| e.to_string())?.kind {
            Some(pb::stream_response::Kind::Output(o)) => {
                outputs.push(f32s(&o.outputs[0].data));
            }
            Some(pb::stream_response::Kind::Summary(_)) => break,
            _ => {}
        }
    }
    sender.await.unwrap();
    Ok(outputs)
}

async fn stats(url: &str) -> pb::StatsResponse {
    let mut admin = pb::admin_client::AdminClient::connect(url.to_string())
        .await
        .unwrap();
    admin.stats(pb::StatsRequest {}).await.unwrap().into_inner()
}

/// Waits (at most 20 s) until `check` holds for the cluster's per-worker live sessions.
async fn wait_for_workers(url: &str, what: &str, check: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live: Vec<u64> = stats(url)
            .await
            .per_worker
            .iter()
            .map(|w| w.live_sessions)
            .collect();
        if check(&live) {
            return live;
        }
        assert!(Instant::now() < deadline, "{what}: workers hold {live:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_process_moves_its_sessions_live_without_losing_or_reordering_a_chunk() {
    const CHUNKS: usize = 100;
    const STREAMS: usize = 16;
    let plans: Vec<Plan> = (0..STREAMS).map(|i| plan(i + 500, CHUNKS)).collect();
    let refs = references(&plans).await;

    let dir = scratch_dir("migration");
    let hosts = hosts_file(&dir, 2);
    let start_process = |process: &'static str| {
        let hosts = hosts.display().to_string();
        let metrics = "127.0.0.1:0".to_string();
        move || {
            let mut args = vec![
                "--workers".to_string(),
                "2".into(),
                "--hosts".into(),
                hosts,
                "--process".into(),
                process.into(),
                "--rebalance-every-s".into(),
                "0.2".into(),
                "--metrics".into(),
                metrics,
            ];
            args.extend(model_args());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            Server::start(&refs)
        }
    };
    let p1 = std::thread::spawn(start_process("1"));
    let p0 = start_process("0")();
    let p1 = p1.join().unwrap();
    let urls = [p0.url(), p1.url()];

    // Streams through both processes' gRPC ports, each routed to its session's owner.
    let runs: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(pipelined(
                urls[i % 2].clone(),
                p.clone(),
                Duration::from_millis(25),
            ))
        })
        .collect();
    let live = wait_for_workers(&urls[0], "every stream open", |l| {
        l.iter().sum::<u64>() == STREAMS as u64
    })
    .await;
    eprintln!("sessions per worker at the start: {live:?}");

    // Drain process 1 (workers 2 and 3) under load: its sessions move to workers 0 and 1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = pb::admin_client::AdminClient::connect(urls[1].clone())
        .await
        .unwrap();
    let drained = admin.drain(pb::DrainRequest {}).await.unwrap().into_inner();
    eprintln!(
        "drain: moved {} sessions in {:.1} ms, kept {}",
        drained.moved_sessions,
        drained.seconds * 1e3,
        drained.kept_sessions
    );
    assert_eq!(drained.kept_sessions, 0);
    let live = wait_for_workers(&urls[0], "process 1 drained", |l| l[2] + l[3] == 0).await;
    eprintln!("sessions per worker after the drain: {live:?}");
    // A drained process takes no new session.
    let refused = pipelined(urls[1].clone(), plans[0].clone(), Duration::ZERO).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("drain")),
        "{refused:?}"
    );

    // Undrained, the rebalancer moves sessions back to its workers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin.undrain(pb::UndrainRequest {}).await.unwrap();
    let live = wait_for_workers(&urls[0], "sessions back on process 1", |l| l[2] + l[3] > 0).await;
    eprintln!("sessions per worker after the undrain: {live:?}");

    for (i, (run, r)) in runs.into_iter().zip(&refs).enumerate() {
        let got = run
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert_close(
            &got,
            &r.outputs,
            &format!("stream {i} ({})", plans[i].model),
        );
    }
    let moved_in: f64 = [&p0, &p1]
        .iter()
        .map(|p| {
            metric(
                &scrape(&p.metrics_addr()),
                "tideway_migrations_total{direction=\"in\"}",
            )
        })
        .sum();
    assert!(
        moved_in >= drained.moved_sessions as f64 && drained.moved_sessions > 0,
        "{moved_in} moves in, {} by the drain",
        drained.moved_sessions
    );
    eprintln!("{moved_in} sessions moved in all");
}
