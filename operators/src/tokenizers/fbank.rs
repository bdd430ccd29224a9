//! Kaldi filterbank features (`compute-fbank-feats`; `torchaudio.compliance.kaldi.fbank`,
//! `kaldi-native-fbank`), with the options the LMUFormer uses (`shared/SPEC-MODELS.md` §4.4):
//! 25 ms frames every 10 ms with `snip_edges` (only whole windows), no dither, per-frame DC
//! removal, pre-emphasis 0.97, a Hanning window, the power spectrum of a zero-padded
//! power-of-two FFT, triangular mel filters (mel = 1127·ln(1 + f/700), 20 Hz to Nyquist) and
//! `ln(max(energy, f32::EPSILON))`; no energy coefficient (so `htk_compat` changes nothing).
//!
//! A stream keeps the samples of its unfinished window ([`FbankStream`]): whatever the chunking,
//! it emits exactly the frames of the whole input, each as soon as its window is complete.
//! Arithmetic is in f64 (the references compute in f32; the difference is ~1e-7 relative).

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// The fbank options Tideway implements (the Kaldi defaults the LMUFormer relies on are
/// fixed: snip_edges, DC removal, pre-emphasis 0.97, power spectrum, log).
#[derive(Debug, Clone, PartialEq)]
pub struct FbankOptions {
    pub sample_rate: u32,
    pub num_mel_bins: usize,
    pub frame_length_ms: f64,
    pub frame_shift_ms: f64,
    pub low_freq: f64,
    /// ≤ 0: relative to the Nyquist frequency (Kaldi's convention).
    pub high_freq: f64,
}

const PREEMPHASIS: f64 = 0.97;

fn mel(hz: f64) -> f64 {
    1127.0 * (1.0 + hz / 700.0).ln()
}

/// One mel filter: the first FFT bin it covers and its weights from there.
#[derive(Debug, Clone)]
struct MelFilter {
    first: usize,
    weights: Vec<f64>,
}

/// A configured filterbank.
#[derive(Clone)]
pub struct Fbank {
    window_len: usize,
    shift: usize,
    padded: usize,
    window: Vec<f64>,
    filters: Vec<MelFilter>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for Fbank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fbank")
            .field("window_len", &self.window_len)
            .field("shift", &self.shift)
            .field("bins", &self.filters.len())
            .finish()
    }
}

/// Options that cannot make a filterbank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("fbank options: {0}")]
pub struct FbankOptionsError(pub String);

impl Fbank {
    pub fn new(o: &FbankOptions) -> Result<Self, FbankOptionsError> {
        let rate = o.sample_rate as f64;
        let window_len = (rate * o.frame_length_ms / 1000.0) as usize;
        let shift = (rate * o.frame_shift_ms / 1000.0) as usize;
        if window_len < 2 || shift == 0 {
            return Err(FbankOptionsError(format!(
                "a {} ms frame every {} ms at {} Hz is {window_len} samples every {shift}; both must be positive (the window at least 2)",
                o.frame_length_ms, o.frame_shift_ms, o.sample_rate
            )));
        }
        let padded = window_len.next_power_of_two();
        let nyquist = rate / 2.0;
        let high = if o.high_freq <= 0.0 {
            nyquist + o.high_freq
        } else {
            o.high_freq
        };
        if o.num_mel_bins < 3 || !(0.0..high).contains(&o.low_freq) || high > nyquist {
            return Err(FbankOptionsError(format!(
                "{} mel bins between {} and {high} Hz at {} Hz: need ≥ 3 bins and 0 ≤ low < high ≤ {nyquist}",
                o.num_mel_bins, o.low_freq, o.sample_rate
            )));
        }
        // Hanning: 0.5 − 0.5·cos(2πn/(N−1)) (Kaldi's "hanning"; torch.hann_window(periodic=False)).
        let window = (0..window_len)
            .map(|n| {
                0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / (window_len - 1) as f64).cos()
            })
            .collect();
        // Triangles equally spaced in mel over the FFT bins below Nyquist (Kaldi's MelBanks).
        let bins = padded / 2;
        let bin_hz = rate / padded as f64;
        let (mel_low, mel_high) = (mel(o.low_freq), mel(high));
        let delta = (mel_high - mel_low) / (o.num_mel_bins + 1) as f64;
        let filters = (0..o.num_mel_bins)
            .map(|b| {
                let left = mel_low + b as f64 * delta;
                let center = left + delta;
                let right = center + delta;
                let weights: Vec<(usize, f64)> = (0..bins)
                    .filter_map(|i| {
                        let m = mel(bin_hz * i as f64);
                        let w = ((m - left) / (center - left)).min((right - m) / (right - center));
                        (m > left && m < right && w > 0.0).then_some((i, w))
                    })
                    .collect();
                let first = weights.first().map_or(0, |&(i, _)| i);
                MelFilter {
                    first,
                    weights: weights.iter().map(|&(_, w)| w).collect(),
                }
            })
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(padded);
        Ok(Fbank {
            window_len,
            shift,
            padded,
            window,
            filters,
            fft,
        })
    }

    pub fn num_mel_bins(&self) -> usize {
        self.filters.len()
    }

    /// Samples per window and between window starts.
    pub fn window_and_shift(&self) -> (usize, usize) {
        (self.window_len, self.shift)
    }

    /// Frames of a whole input of `samples` samples (snip_edges).
    pub fn num_frames(&self, samples: usize) -> usize {
        if samples < self.window_len {
            0
        } else {
            1 + (samples - self.window_len) / self.shift
        }
    }

    /// The features of one window of samples (`window_len` of them) into `out` (mel bins).
    pub fn frame(&self, samples: &[f32], out: &mut [f32]) {
        assert_eq!(samples.len(), self.window_len);
        let mut buf = vec![0.0f64; self.padded];
        let frame = &mut buf[..self.window_len];
        for (b, &s) in frame.iter_mut().zip(samples) {
            *b = s as f64;
        }
        let mean = frame.iter().sum::<f64>() / self.window_len as f64;
        frame.iter_mut().for_each(|v| *v -= mean);
        // Pre-emphasis, first sample against itself: x[i] − 0.97·x[i−1], x[−1] = x[0].
        for i in (1..self.window_len).rev() {
            frame[i] -= PREEMPHASIS * frame[i - 1];
        }
        frame[0] -= PREEMPHASIS * frame[0];
        for (v, w) in frame.iter_mut().zip(&self.window) {
            *v *= w;
        }
        let mut spectrum = self.fft.make_output_vec();
        self.fft
            .process(&mut buf, &mut spectrum)
            .expect("buffers sized by the plan");
        let power: Vec<f64> = spectrum.iter().map(|c| c.norm_sqr()).collect();
        for (o, f) in out.iter_mut().zip(&self.filters) {
            let energy: f64 = f
                .weights
                .iter()
                .zip(&power[f.first..])
                .map(|(w, p)| w * p)
                .sum();
            *o = energy.max(f32::EPSILON as f64).ln() as f32;
        }
    }

    /// Every frame of a whole input, `[frames, mel bins]`.
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let mut stream = FbankStream::default();
        self.push(&mut stream, samples)
    }

    /// Feeds a stream's new samples; returns the frames whose windows are now complete.
    pub fn push(&self, stream: &mut FbankStream, samples: &[f32]) -> Vec<f32> {
        stream.pending.extend_from_slice(samples);
        let frames = self.num_frames(stream.pending.len());
        let bins = self.num_mel_bins();
        let mut out = vec![0.0f32; frames * bins];
        for (t, row) in out.chunks_exact_mut(bins).enumerate() {
            let start = t * self.shift;
            self.frame(&stream.pending[start..start + self.window_len], row);
        }
        stream.pending.drain(..frames * self.shift);
        out
    }
}

/// A stream's samples not yet consumed by a complete window (fewer than one window plus a
/// shift): the carry-over kept in its session state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FbankStream {
    pending: Vec<f32>,
}

impl FbankStream {
    pub fn size_bytes(&self) -> usize {
        4 * self.pending.capacity()
    }

    pub fn export(&self, out: &mut crate::state_tensors::StateTensors) {
        out.put_f32("frontend.fbank.pending", &self.pending);
    }

    pub fn import(
        from: &crate::state_tensors::StateTensors,
    ) -> Result<Self, crate::state_tensors::StateError> {
        Ok(FbankStream {
            pending: from.f32s("frontend.fbank.pending")?.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FbankOptions {
        FbankOptions {
            sample_rate: 16000,
            num_mel_bins: 40,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            low_freq: 20.0,
            high_freq: 0.0,
        }
    }

    #[test]
    fn any_chunking_gives_the_frames_of_the_whole_input() {
        let fbank = Fbank::new(&options()).unwrap();
        let samples: Vec<f32> = (0..7321)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0)
            .collect();
        let whole = fbank.compute(&samples);
        assert_eq!(whole.len(), fbank.num_frames(samples.len()) * 40);
        for step in [1usize, 159, 160, 161, 400, 1000] {
            let mut stream = FbankStream::default();
            let mut got = Vec::new();
            for chunk in samples.chunks(step) {
                got.extend(fbank.push(&mut stream, chunk));
            }
            assert_eq!(got, whole, "chunks of {step}");
            assert!(stream.pending.len() < 400);
        }
    }

    #[test]
    fn a_tone_peaks_in_its_mel_bin_and_silence_is_the_log_floor() {
        let fbank = Fbank::new(&options()).unwrap();
        let tone: Vec<f32> = (0..1600)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin() * 0.5)
            .collect();
        let frames = fbank.compute(&tone);
        let row = &frames[..40];
        let peak = (0..40).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        // 1 kHz is mel 1000.0 ≈ filter centre of bin b where mel_low + (b+1)·Δ ≈ 1000.
        let (lo, hi) = (mel(20.0), mel(8000.0));
        let want = ((mel(1000.0) - lo) / ((hi - lo) / 41.0)).round() as usize - 1;
        assert!(peak.abs_diff(want) <= 1, "peak bin {peak}, want ≈ {want}");
        let silence = fbank.compute(&[0.0; 400]);
        assert!(
            silence
                .iter()
                .all(|&v| v == (f32::EPSILON as f64).ln() as f32)
        );
    }
}
