//! Helpers shared by the end-to-end tests: the `tideway` binary, fixtures, scratch
//! directories, safetensors reading and the relative-error measure.

#![allow(dead_code)]

pub mod sessions;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use tideway_proto::inference as ipb;
use tideway_proto::tideway::v1 as pb;

pub fn tideway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tideway"))
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A fresh, empty directory under cargo's per-target scratch space.
pub fn scratch_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a checkpoint directory (flat) so that a test can break it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A tensor read back from a safetensors file, widened to f64 (ints and floats alike).
pub struct Loaded {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

pub fn read_tensor(path: &Path, name: &str) -> Loaded {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let view = file
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: no tensor {name}: {e}", path.display()));
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    Loaded {
        shape: view.shape().to_vec(),
        values,
    }
}

/// ‖got − want‖ / ‖want‖.
pub fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f64 = want.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A loopback port free now, for a socket that a child process binds by number (a cluster's
/// timely transport, a tensor-parallel leader's control address).
///
/// Taken below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`,
/// 32768-60999 by default), from which `bind(":0")` and every outgoing connection take their
/// ports: a port found by binding `:0` and released for the child could be given to any of
/// the tests' other sockets before the child binds it, which a clean-clone run met once
/// ("Address already in use" starting a pipeline cluster, 2026-12-06). Unique within this test
/// process (a counter from a start set by the process id) and checked free now.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOWEST: usize = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1_000);
    let start = std::process::id() as usize * 7_919 % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free loopback port below {ephemeral}");
        let port = u16::try_from(LOWEST + (start + n) % span).expect("a port number");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `--hosts` file in `dir` listing `processes` loopback addresses on free ports.
pub fn hosts_file(dir: &Path, processes: usize) -> PathBuf {
    let lines: String = (0..processes)
        .map(|_| format!("127.0.0.1:{}\n", free_port()))
        .collect();
    let path = dir.join("hosts.txt");
    std::fs::write(&path, lines).unwrap();
    path
}

/// A `tideway serve` process on a loopback port chosen at run time; killed when dropped.
pub struct Server {
    child: std::process::Child,
    pub addr: String,
    pub stderr_log: PathBuf,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(args, "127.0.0.1:0")
    }

    pub fn start_with(args: &[&str], listen: &str) -> Server {
        let log = scratch_dir("serve").join("stderr.log");
        let child = tideway()
            .arg("serve")
            .args(["--listen", listen])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            addr: String::new(),
            stderr_log: log,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
            // The line may be read while it is being written: take it once the address parses.
            if let Some(addr) = text
                .lines()
                .filter_map(|l| l.strip_prefix("tideway listening on "))
                .find(|a| a.trim().parse::<std::net::SocketAddr>().is_ok())
            {
                server.addr = addr.trim().to_string();
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("tideway serve exited with {status}: {text}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tideway serve did not start: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The address of the metrics endpoint the server printed (`--metrics 127.0.0.1:0`).
    pub fn metrics_addr(&self) -> String {
        self.stderr()
            .lines()
            .find_map(|l| {
                l.strip_prefix("tideway metrics on http://")
                    .map(|a| a.trim_end_matches("/metrics").to_string())
            })
            .expect("the metrics address is printed")
    }

    /// The exit status, if the process ends within `limit`.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random values (xorshift), for token ids and chunk sizes.
pub fn pseudo_random(count: usize, below: u64, seed: u64) -> Vec<u64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % below
        })
        .collect()
}

/// `tideway run` logits for `tokens` on `model`.
pub fn run_reference(model: &Path, tokens: &[u64]) -> Loaded {
    let out = scratch_dir("reference").join("out.safetensors");
    let list = tokens
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let output = tideway()
        .args(["run", "--model"])
        .arg(model)
        .args(["--tokens", &list, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    read_tensor(&out, "logits")
}

/// Little-endian f32 bytes (an output tensor's `data`) as f64.
pub fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect()
}

/// GETs the Prometheus page at `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

/// The values of the metric lines of `page` that start with `line_start`.
pub fn metric_values(page: &str, line_start: &str) -> Vec<f64> {
    page.lines()
        .filter(|l| l.starts_with(line_start))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// The value of the one metric line of `page` that starts with `line_start`.
pub fn metric(page: &str, line_start: &str) -> f64 {
    *metric_values(page, line_start)
        .first()
        .unwrap_or_else(|| panic!("no {line_start} in\n{page}"))
}

/// A stream's `start` of a new session of `model`.
pub fn start_request(model: &str) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Start(pb::StreamStart {
            model: model.into(),
            ..Default::default()
        })),
    }
}

/// Opens a `Streams.Open` stream on `url` with `first` (its start, and any chunks) already
/// sent: the sender for what follows and the stream's answers.
pub async fn open_stream(
    url: &str,
    first: Vec<pb::StreamRequest>,
) -> (
    tokio::sync::mpsc::Sender<pb::StreamRequest>,
    tonic::Streaming<pb::StreamResponse>,
) {
    let mut client = pb::streams_client::StreamsClient::connect(url.to_string())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(first.len() + 8);
    for request in first {
        tx.send(request).await.unwrap();
    }
    let inbound = client
        .open(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// A `StreamChunk` of token ids.
pub fn token_chunk(tokens: &[u64], end: bool) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Chunk(pb::StreamChunk {
            tokens: tokens.iter().map(|&t| t as i64).collect(),
            end,
            ..Default::default()
        })),
    }
}

/// Every output row of a stream's first output tensor, or the status the stream ended with.
pub async fn output_rows(
    mut inbound: tonic::Streaming<pb::StreamResponse>,
) -> Result<Vec<f64>, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut rows = Vec::new();
    while let Some(message) = inbound.next().await {
        if let pb::stream_response::Kind::Output(o) = message?.kind.unwrap() {
            rows.extend(f32s(&o.outputs[0].data));
        }
    }
    Ok(rows)
}

/// The first model a server at `url` lists.
pub async fn first_model(url: &str) -> pb::ModelInfo {
    let mut models = pb::models_client::ModelsClient::connect(url.to_string())
        .await
        .unwrap();
    models
        .list(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .remove(0)
}

/// An inference-protocol request of token `ids` for `model` (raw INT64, shape [T]).
pub fn infer_ids_request(model: &str, ids: &[i64]) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![ids.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![ids.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    }
}
