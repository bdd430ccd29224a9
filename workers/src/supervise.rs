//! `tideway supervise`: runs the processes of a cluster that live on this host and restarts
//! them together. Timely cannot lose a process and go on: when a peer is lost every process
//! of the cluster exits (a worker or its network thread panics, and `serve` exits with 101),
//! so the supervisor waits for all of its children to be gone (killing any that linger), then
//! starts them again; they re-form the cluster from `--hosts` and restore their sessions from
//! `--store`. On another host the same job falls to systemd (`deployments/systemd/`).
//!
//! ```text
//! tideway supervise --hosts hosts.txt --processes 0,1,2 -- \
//!     --model m=DIR --listen 127.0.0.1:5005{process} --store /var/lib/tideway
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct SuperviseArgs {
    /// The cluster's hosts file (one `host:port` per process), passed to every process.
    #[arg(long)]
    hosts: PathBuf,
    /// The processes (lines of --hosts) that run on this host; default: all of them.
    #[arg(long, value_delimiter = ',')]
    processes: Vec<usize>,
    /// Seconds a lingering process gets after a peer exited before it is killed.
    #[arg(long, default_value_t = 5.0)]
    linger_s: f64,
    /// Seconds between a cluster's exit and its restart (doubling, up to 30 s, while the
    /// processes keep exiting within a minute of their start).
    #[arg(long, default_value_t = 0.5)]
    backoff_s: f64,
    /// Stop after this many restarts (0: never stop).
    #[arg(long, default_value_t = 0)]
    max_restarts: usize,
    /// `tideway serve` arguments for every process; `{process}` is replaced by the process's
    /// index (for its --listen or --metrics port).
    #[arg(last = true, required = true)]
    serve: Vec<String>,
}

/// Set by SIGINT / SIGTERM: stop the children and exit.
static STOPPING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOPPING.store(true, Ordering::SeqCst);
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

struct Cluster {
    children: Vec<(usize, Child)>,
    started: Instant,
}

impl Cluster {
    fn start(args: &SuperviseArgs, processes: &[usize]) -> Result<Cluster> {
        let exe = std::env::current_exe().context("cannot find the tideway binary")?;
        let mut children = Vec::new();
        for &p in processes {
            let serve: Vec<String> = args
                .serve
                .iter()
                .map(|a| a.replace("{process}", &p.to_string()))
                .collect();
            let child = Command::new(&exe)
                .arg("serve")
                .arg("--hosts")
                .arg(&args.hosts)
                .args(["--process", &p.to_string()])
                .args(&serve)
                .spawn()
                .with_context(|| format!("cannot start process {p}"))?;
            status_line!(
                "tideway supervise: started process {p} (pid {})",
                child.id()
            );
            children.push((p, child));
        }
        Ok(Cluster {
            children,
            started: Instant::now(),
        })
    }

    /// The first child to exit, with its status (polling; None when asked to stop).
    fn wait_first(&mut self) -> Option<(usize, ExitStatus)> {
        loop {
            if STOPPING.load(Ordering::SeqCst) {
                return None;
            }
            for (p, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some((*p, status));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `linger` for every child to exit, then kills the rest.
    fn wait_all(&mut self, linger: Duration) {
        let deadline = Instant::now() + linger;
        for (p, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        status_line!(
                            "tideway supervise: process {p} exited ({})",
                            describe(status)
                        );
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        status_line!("tideway supervise: process {p} lingers; killing it");
                        signal(child, libc::SIGKILL);
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

pub fn supervise(args: SuperviseArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.hosts)
        .with_context(|| format!("cannot read --hosts {}", args.hosts.display()))?;
    let count = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let processes: Vec<usize> = match args.processes.is_empty() {
        true => (0..count).collect(),
        false => args.processes.clone(),
    };
    if let Some(p) = processes.iter().find(|&&p| p >= count) {
        bail!(
            "--processes {p} is out of range: {} lists {count} processes",
            args.hosts.display()
        );
    }
    let positive = |x: f64| x.is_finite() && x >= 0.0;
    if !positive(args.linger_s) || !positive(args.backoff_s) {
        bail!("--linger-s and --backoff-s must be non-negative");
    }
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let linger = Duration::from_secs_f64(args.linger_s);
    let mut backoff = Duration::from_secs_f64(args.backoff_s);
    let mut restarts = 0;
    loop {
        let mut cluster = Cluster::start(&args, &processes)?;
        match cluster.wait_first() {
            Some((p, status)) => {
                status_line!(
                    "tideway supervise: process {p} exited ({}); the cluster restarts",
                    describe(status)
                );
                let lost_at = Instant::now();
                cluster.wait_all(linger);
                status_line!(
                    "tideway supervise: all {} processes gone {:.0} ms after the first",
                    processes.len(),
                    lost_at.elapsed().as_secs_f64() * 1e3
                );
            }
            None => {
                status_line!("tideway supervise: stopping the cluster");
                for (_, child) in &cluster.children {
                    signal(child, libc::SIGTERM);
                }
                cluster.wait_all(Duration::from_secs(30));
                return Ok(());
            }
        }
        restarts += 1;
        if args.max_restarts > 0 && restarts > args.max_restarts {
            bail!(
                "the cluster exited {restarts} times (--max-restarts {})",
                args.max_restarts
            );
        }
        // A cluster that keeps failing soon after its start waits longer each time.
        if cluster.started.elapsed() >= Duration::from_secs(60) {
            backoff = Duration::from_secs_f64(args.backoff_s);
        }
        let wait = backoff;
        backoff = (backoff * 2).min(Duration::from_secs(30));
        status_line!(
            "tideway supervise: restart {restarts} in {:.1} s",
            wait.as_secs_f64()
        );
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if STOPPING.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
