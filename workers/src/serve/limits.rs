//! What one client may make the server do: the limits of `tideway serve`, each a flag with a
//! default that a well-behaved client never meets. A refusal is RESOURCE_EXHAUSTED (or
//! INVALID_ARGUMENT for input no limit could make right), names the flag, and is counted in
//! `tideway_limit_refusals_total{limit}`.

use clap::Args;

use super::stages::lifecycle::SessionLimits;
use tideway_operators::tokenizers::audio::AudioLimits;
use tideway_operators::tokenizers::text::DEFAULT_MAX_HELD_TEXT;
use tideway_proto::decode::RequestLimits;

#[derive(Args, Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest gRPC message sent, in bytes: a request whose answer could not fit is refused
    /// before the model runs it.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    /// Largest gRPC message accepted, in bytes: compressed, and again decompressed (tonic
    /// stops decompressing at this size, so a gzip bomb costs at most this much). Longer jobs
    /// upload in pieces (`Jobs.SubmitStream`).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_request_bytes: usize,
    /// Tokens (or feature frames) one request may carry: a stream chunk, an inference
    /// request. Longer sequences go to Jobs, which run them in bounded steps.
    #[arg(long, default_value_t = 32_768)]
    pub max_request_tokens: usize,
    /// New tokens one generation may ask for (`Generate`, `max_tokens`).
    #[arg(long, default_value_t = 4096)]
    pub max_new_tokens: usize,
    /// Tokens one job may carry.
    #[arg(long, default_value_t = 1 << 22)]
    pub max_job_tokens: usize,
    /// Tokens a job runs per step, whatever `chunk` it asks for: other sessions wait at most
    /// one such step for it, and Cancel takes effect within one.
    #[arg(long, default_value_t = 2048)]
    pub max_job_chunk: usize,
    /// Refusals for its own limits a caller (bearer token, else connection) earns back per
    /// second: past its burst, its calls are refused at the door, unread, until it has
    /// (`serve/refusals.rs`). 0: no such budget.
    #[arg(long, default_value_t = 5.0)]
    pub refusals_per_s: f64,
    /// Refusals a caller may earn at once before its calls are refused unread.
    #[arg(long, default_value_t = 10)]
    pub refusal_burst: u32,
    /// Milliseconds of the worker's time a job's step aims at (its tokens sized to fit, up to
    /// --max-job-chunk): sessions sharing the worker wait about that long for a job. 0: every
    /// step is --max-job-chunk tokens (or the job's own `chunk`).
    #[arg(long, default_value_t = 5.0)]
    pub job_step_ms: f64,
    /// Bytes of finished jobs' results kept for Get / Watch; the oldest go first.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_job_results_bytes: usize,
    /// Seconds a finished job's result is kept.
    #[arg(long, default_value_t = 600.0)]
    pub job_result_ttl_s: f64,
    /// Sessions live at once on this server (divided evenly over its workers: each holds
    /// at most its share, since sessions are spread by a hash of their names).
    #[arg(long, default_value_t = 100_000)]
    pub max_sessions: usize,
    /// Sessions one client identity may hold at once (each worker its share).
    #[arg(long, default_value_t = 10_000)]
    pub max_sessions_per_client: usize,
    /// Bytes of answers a stream holds for a client that reads slowly; then the stream stops
    /// reading the client's requests until it catches up.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_stream_buffer_bytes: usize,
    /// Bytes of text a stream may hold undecided (text with no word boundary waits for one).
    #[arg(long, default_value_t = DEFAULT_MAX_HELD_TEXT)]
    pub max_held_text_bytes: usize,
    /// Lowest audio sample rate accepted, Hz (a stream keeps its first chunk's rate).
    #[arg(long, default_value_t = AudioLimits::default().min_rate)]
    pub min_sample_rate: u32,
    /// Highest audio sample rate accepted, Hz.
    #[arg(long, default_value_t = AudioLimits::default().max_rate)]
    pub max_sample_rate: u32,
    /// Audio samples accepted per chunk, counted at the model's sample rate (after
    /// resampling).
    #[arg(long, default_value_t = AudioLimits::default().max_chunk_samples)]
    pub max_chunk_samples: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let audio = AudioLimits::default();
        Limits {
            max_message_bytes: 256 << 20,
            max_request_bytes: 16 << 20,
            job_step_ms: 5.0,
            refusals_per_s: 5.0,
            refusal_burst: 10,
            max_request_tokens: 32_768,
            max_new_tokens: 4096,
            max_job_tokens: 1 << 22,
            max_job_chunk: 2048,
            max_job_results_bytes: 256 << 20,
            job_result_ttl_s: 600.0,
            max_sessions: 100_000,
            max_sessions_per_client: 10_000,
            max_stream_buffer_bytes: 64 << 20,
            max_held_text_bytes: DEFAULT_MAX_HELD_TEXT,
            min_sample_rate: audio.min_rate,
            max_sample_rate: audio.max_rate,
            max_chunk_samples: audio.max_chunk_samples,
        }
    }
}

impl Limits {
    /// Refuses limits that contradict each other or leave nothing to serve.
    pub fn check(&self) -> Result<(), String> {
        if self.min_sample_rate == 0 || self.min_sample_rate > self.max_sample_rate {
            return Err(format!(
                "--min-sample-rate {} and --max-sample-rate {} make no range of rates (1 Hz ≤ min ≤ max)",
                self.min_sample_rate, self.max_sample_rate
            ));
        }
        if self.refusals_per_s.is_nan() || self.refusals_per_s < 0.0 {
            return Err(format!(
                "--refusals-per-s {} must be a rate ≥ 0",
                self.refusals_per_s
            ));
        }
        if self.job_step_ms.is_nan() || self.job_step_ms < 0.0 {
            return Err(format!(
                "--job-step-ms {} must be a number of milliseconds ≥ 0",
                self.job_step_ms
            ));
        }
        if self.job_result_ttl_s.is_nan() || self.job_result_ttl_s < 0.0 {
            return Err(format!(
                "--job-result-ttl-s {} must be a number of seconds ≥ 0",
                self.job_result_ttl_s
            ));
        }
        for (flag, value) in [
            ("--max-message-bytes", self.max_message_bytes),
            ("--max-request-bytes", self.max_request_bytes),
            ("--max-request-tokens", self.max_request_tokens),
            ("--max-new-tokens", self.max_new_tokens),
            ("--max-job-tokens", self.max_job_tokens),
            ("--max-job-chunk", self.max_job_chunk),
            ("--max-sessions", self.max_sessions),
            ("--max-sessions-per-client", self.max_sessions_per_client),
            ("--max-chunk-samples", self.max_chunk_samples),
            ("--max-held-text-bytes", self.max_held_text_bytes),
            ("--max-stream-buffer-bytes", self.max_stream_buffer_bytes),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(())
    }

    /// The limits the request decoders check (`tideway_proto::decode`).
    pub fn requests(&self) -> RequestLimits {
        RequestLimits {
            max_request_tokens: self.max_request_tokens,
            max_message_bytes: self.max_message_bytes,
        }
    }

    pub fn audio(&self) -> AudioLimits {
        AudioLimits {
            min_rate: self.min_sample_rate,
            max_rate: self.max_sample_rate,
            max_chunk_samples: self.max_chunk_samples,
        }
    }

    /// What one of `workers` workers may hold: its share of each session limit.
    pub fn session_limits(&self, workers: usize) -> SessionLimits {
        let workers = workers.max(1);
        SessionLimits {
            per_worker: self.max_sessions.div_ceil(workers),
            server: self.max_sessions,
            per_client_per_worker: self.max_sessions_per_client.div_ceil(workers),
            per_client: self.max_sessions_per_client,
        }
    }
}
