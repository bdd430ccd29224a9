//! Stop strings found in streamed text, across token boundaries.
//!
//! Text that could be the start of a stop string is held back until the next piece decides
//! it, so a stop string is always found whole in the held text, however the tokens cut it.
//! Released text never contains a stop string; the stop string itself is not released (as
//! the OpenAI API and vLLM answer).

/// One generation's stop strings and the text it holds back.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What a new piece of text gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Text that can be released now (possibly empty: all held).
    Release(String),
    /// A stop string was found: the text before it, and which one.
    Stopped { text: String, stop: usize },
}

impl StopStrings {
    /// Empty strings are ignored (they would stop before the first token).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Adds `piece`; the text that can be released, or the stop.
    pub fn push(&mut self, piece: &str) -> StopScan {
        self.held.push_str(piece);
        // The earliest stop string in the held text (the first listed where two start at once).
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, stop)) = found {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopScan::Stopped { text, stop };
        }
        let keep = self.partial_match_len();
        let release = self.held.len() - keep;
        let text = self.held[..release].to_string();
        self.held.drain(..release);
        StopScan::Release(text)
    }

    /// The held text at the end of the generation (no stop string came).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The longest suffix of the held text (at a character boundary) that begins some stop
    /// string.
    fn partial_match_len(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .map_or(0, |i| self.held.len() - i)
    }
}
