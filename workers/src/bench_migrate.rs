//! `tideway bench migrate`: what moving sessions live costs. Starts a cluster of two
//! `tideway serve` processes on loopback (this binary, `--workers` each), opens N kept
//! sessions of the model (each fed one chunk of `--tokens` ids, or `--audio-ms` of audio), then
//! drains each process in turn (`Admin.Drain`, which answers once every session it held has
//! moved to the other) and undrains it. The table gives, per drain, the sessions moved, the
//! drain's wall time, the time per session and the state moved; every session then takes one
//! more chunk, to show none was lost. The peer, in the same run: the client moving each
//! session itself (`ExportState` from one process, a new session from the blob on the other,
//! 64 at a time).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tideway_proto::tideway::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Args, Clone)]
pub struct MigrateBenchArgs {
    /// The model's checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Sessions held by the cluster.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Drains: each drains one process (alternately) and then undrains it.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Worker threads of each of the two processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Tokens of each session's chunk (language models).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Milliseconds of audio of each session's chunk (feature models with an audio front end).
    #[arg(long, default_value_t = 100)]
    audio_ms: usize,
}

/// The two processes of the cluster; killed when dropped.
struct Cluster {
    children: Vec<Child>,
    urls: Vec<String>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    fn start(args: &MigrateBenchArgs) -> Result<Cluster> {
        let dir =
            std::env::temp_dir().join(format!("tideway-bench-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let hosts = dir.join("hosts.txt");
        std::fs::write(
            &hosts,
            format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port()?, free_port()?),
        )?;
        let exe = std::env::current_exe().context("cannot find the tideway binary")?;
        let mut cluster = Cluster {
            children: Vec::new(),
            urls: Vec::new(),
            dir: dir.clone(),
        };
        for process in 0..2 {
            let log = std::fs::File::create(dir.join(format!("process-{process}.log")))?;
            let child = Command::new(&exe)
                .args(["serve", "--listen", "127.0.0.1:0", "--hosts"])
                .arg(&hosts)
                .args(["--process", &process.to_string()])
                .args(["--workers", &args.workers.to_string()])
                .args(["--idle-timeout-s", "86400", "--model"])
                .arg(&args.model)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start a tideway serve process")?;
            cluster.children.push(child);
        }
        for process in 0..2 {
            let url = cluster.wait_listening(process)?;
            cluster.urls.push(url);
        }
        Ok(cluster)
    }

    /// The gRPC address process `process` prints once the cluster has formed.
    fn wait_listening(&mut self, process: usize) -> Result<String> {
        let log = self.dir.join(format!("process-{process}.log"));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // The line may be read while it is being written: take it once the address parses.
            if let Some(addr) = text
                .lines()
                .filter_map(|l| l.strip_prefix("tideway listening on "))
                .find(|a| a.trim().parse::<std::net::SocketAddr>().is_ok())
            {
                return Ok(format!("http://{}", addr.trim()));
            }
            if let Some(status) = self.children[process].try_wait()? {
                bail!("serve process {process} exited ({status}): {text}");
            }
            if Instant::now() > deadline {
                bail!("serve process {process} did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn chunk(args: &MigrateBenchArgs, info: &pb::ModelInfo, i: usize) -> pb::StreamChunk {
    let mut chunk = pb::StreamChunk::default();
    if info.vocab_size > 0 {
        chunk.tokens = (0..args.tokens)
            .map(|t| ((i * 7919 + t * 31) % info.vocab_size as usize) as i64)
            .collect();
    } else {
        let rate = 16_000;
        let n = rate * args.audio_ms / 1000;
        chunk.samples_f32 = (0..n)
            .map(|s| (((i * 131 + s) % 997) as f32 / 997.0 - 0.5) * 0.2)
            .collect();
        chunk.sample_rate = rate as u32;
    }
    chunk
}

/// Opens a stream (a new kept session, or `resume`), sends `chunk`, and returns the session
/// id once its output has come.
async fn one_chunk(
    channel: Channel,
    model: &str,
    resume: &str,
    chunk: pb::StreamChunk,
) -> Result<String> {
    let mut client = pb::streams_client::StreamsClient::new(channel);
    let (tx, rx) = mpsc::channel(2);
    let start = pb::StreamStart {
        model: model.into(),
        keep: true,
        resume_session_id: resume.into(),
        ..Default::default()
    };
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(start)),
    })
    .await?;
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            end: true,
            ..chunk
        })),
    })
    .await?;
    drop(tx);
    let mut inbound = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let mut id = String::new();
    while let Some(message) = inbound.next().await {
        match message?.kind {
            Some(pb::stream_response::Kind::Opened(o)) => id = o.session_id,
            Some(pb::stream_response::Kind::Summary(_)) => break,
            _ => {}
        }
    }
    Ok(id)
}

/// Runs `one_chunk` for every session, 64 at a time.
async fn every_session(
    channels: &[Channel],
    args: &MigrateBenchArgs,
    info: &pb::ModelInfo,
    resume: &[String],
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(args.sessions);
    for batch in (0..args.sessions).collect::<Vec<_>>().chunks(64) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&i| {
                let channel = channels[i % channels.len()].clone();
                let (model, chunk) = (info.name.clone(), chunk(args, info, i));
                let resume = resume.get(i).cloned().unwrap_or_default();
                tokio::spawn(async move { one_chunk(channel, &model, &resume, chunk).await })
            })
            .collect();
        for task in tasks {
            ids.push(task.await??);
        }
    }
    Ok(ids)
}

/// The client's own move of every session: `ExportState` through process 0, then a new
/// session from the blob through process 1; returns the blobs' bytes.
async fn client_moves(channels: &[Channel], model: &str, ids: &[String]) -> Result<u64> {
    let mut bytes = 0;
    for batch in ids.chunks(64) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|id| {
                let (from, to) = (channels[0].clone(), channels[1].clone());
                let (model, id) = (model.to_string(), id.clone());
                tokio::spawn(async move {
                    let state = pb::streams_client::StreamsClient::new(from)
                        .export_state(pb::ExportStateRequest {
                            model: model.clone(),
                            session_id: id,
                        })
                        .await?
                        .into_inner()
                        .state;
                    let n = state.len() as u64;
                    let (tx, rx) = mpsc::channel(1);
                    let start = pb::StreamStart {
                        model,
                        state,
                        keep: true,
                        ..Default::default()
                    };
                    tx.send(pb::StreamRequest {
                        kind: Some(pb::stream_request::Kind::Start(start)),
                    })
                    .await?;
                    drop(tx);
                    let mut inbound = pb::streams_client::StreamsClient::new(to)
                        .open(ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    while inbound.next().await.transpose()?.is_some() {}
                    anyhow::Ok(n)
                })
            })
            .collect();
        for task in tasks {
            bytes += task.await??;
        }
    }
    Ok(bytes)
}

async fn live_per_process(channel: Channel) -> Result<Vec<u64>> {
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let stats = admin.stats(pb::StatsRequest {}).await?.into_inner();
    let mut per_process = vec![0; stats.processes as usize];
    for w in stats.per_worker {
        per_process[w.process as usize] += w.live_sessions;
    }
    Ok(per_process)
}

pub fn bench_migrate(args: MigrateBenchArgs) -> Result<()> {
    if !Path::new(&args.model).join("config.json").exists() {
        bail!("--model {}: no config.json there", args.model.display());
    }
    let cluster = Cluster::start(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut channels = Vec::new();
        for url in &cluster.urls {
            channels.push(Channel::from_shared(url.clone())?.connect().await?);
        }
        let mut models = pb::models_client::ModelsClient::new(channels[0].clone());
        let info = models
            .list(pb::ListModelsRequest {})
            .await?
            .into_inner()
            .models
            .remove(0);
        let opened = Instant::now();
        let ids = every_session(&channels, &args, &info, &[]).await?;
        eprintln!(
            "{} sessions of {} ({} state bytes each) opened in {:.2} s",
            ids.len(),
            info.name,
            info.state_bytes_per_session,
            opened.elapsed().as_secs_f64()
        );
        println!(
            "| drain | moved | answered (s) | all arrived (s) | ms / session | MB moved |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let mut per_session = Vec::new();
        for round in 0..args.rounds {
            let process = (round + 1) % 2;
            let before = live_per_process(channels[0].clone()).await?;
            let mut admin = pb::admin_client::AdminClient::new(channels[process].clone());
            let started = Instant::now();
            let drained = admin.drain(pb::DrainRequest {}).await?.into_inner();
            // Arrived: the control plane counts every session at its new owner (the +1 of
            // its arrival comes after its state was taken in there).
            let settle = Instant::now() + Duration::from_secs(30);
            let mut after = live_per_process(channels[0].clone()).await?;
            while (after[process] > drained.kept_sessions
                || after.iter().sum::<u64>() < ids.len() as u64)
                && Instant::now() < settle
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
                after = live_per_process(channels[0].clone()).await?;
            }
            let arrived = started.elapsed().as_secs_f64();
            admin.undrain(pb::UndrainRequest {}).await?;
            if drained.kept_sessions > 0 {
                bail!(
                    "process {process} kept {} sessions",
                    drained.kept_sessions
                );
            }
            let ms = arrived * 1e3 / drained.moved_sessions.max(1) as f64;
            per_session.push(ms);
            println!(
                "| process {process} (held {:?}, then {:?}) | {} | {:.3} | {:.3} | {:.3} | {:.1} |",
                before,
                after,
                drained.moved_sessions,
                drained.seconds,
                arrived,
                ms,
                (drained.moved_sessions * info.state_bytes_per_session) as f64 / 1e6
            );
        }
        per_session.sort_by(f64::total_cmp);
        if let Some(median) = per_session.get(per_session.len() / 2) {
            println!("median {median:.3} ms per session moved");
        }
        // Every session is still there, wherever it moved: each takes one more chunk.
        let resumed = every_session(&channels, &args, &info, &ids).await?;
        if resumed != ids {
            bail!("a session did not resume after the moves");
        }
        let live: u64 = live_per_process(channels[0].clone()).await?.iter().sum();
        eprintln!("all {} sessions resumed after the moves ({live} live)", ids.len());
        let started = Instant::now();
        let bytes = client_moves(&channels, &info.name, &ids).await?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "peer: the client exports and re-imports each session: {} sessions in {seconds:.3} s, {:.3} ms per session, {:.1} MB of blobs",
            ids.len(),
            seconds * 1e3 / ids.len().max(1) as f64,
            bytes as f64 / 1e6
        );
        Ok(())
    })
}
