//! Keyword detections from a keyword spotter's outputs on a live feed, window by window.

/// Detections from overlapping windows' clip scores: a window whose top class (softmax of the
/// mean of its per-frame outputs) is a keyword with at least `threshold` starts a detection;
/// following windows with the same top class belong to it; it is reported when a window
/// with another top class ends it, with its best score and the end time of that window.
pub struct WindowDetector {
    labels: Vec<String>,
    threshold: f32,
    current: Option<WindowDetection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WindowDetection {
    pub label: String,
    pub time_s: f64,
    pub score: f32,
}

impl WindowDetector {
    pub fn new(labels: Vec<String>) -> Self {
        WindowDetector {
            labels,
            threshold: 0.5,
            current: None,
        }
    }

    /// One complete window's per-frame outputs, ending `end_s` into the audio; the keyword it
    /// completes, if any. At the end of the audio, push an empty window to flush.
    pub fn push_window(&mut self, rows: &[Vec<f32>], end_s: f64) -> Option<WindowDetection> {
        let top = (!rows.is_empty()).then(|| {
            let n = self.labels.len();
            let mut mean = vec![0.0f64; n];
            for row in rows {
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += v as f64 / rows.len() as f64;
                }
            }
            let max = mean.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = mean.iter().map(|m| (m - max).exp()).sum();
            let (k, p) = mean
                .iter()
                .enumerate()
                .map(|(i, m)| (i, ((m - max).exp() / total) as f32))
                .fold((0, 0.0f32), |b, x| if x.1 > b.1 { x } else { b });
            (k, p)
        });
        let keyword = top.filter(|&(k, p)| !self.labels[k].starts_with('_') && p >= self.threshold);
        match (&mut self.current, keyword) {
            (Some(cur), Some((k, p))) if cur.label == self.labels[k] => {
                if p > cur.score {
                    cur.score = p;
                    cur.time_s = end_s;
                }
                None
            }
            (_, Some((k, p))) => self.current.replace(WindowDetection {
                label: self.labels[k].clone(),
                time_s: end_s,
                score: p,
            }),
            (_, None) => self.current.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["yes", "no", "_unknown_", "_silence_"]
            .map(String::from)
            .to_vec()
    }

    fn window(class: usize, strength: f32) -> Vec<Vec<f32>> {
        let mut row = vec![0.0; 4];
        row[class] = strength;
        vec![row; 10]
    }

    #[test]
    fn one_detection_per_run_of_windows_with_its_best_score() {
        let mut d = WindowDetector::new(labels());
        let mut got = Vec::new();
        let plan = [
            (3, 5.0),
            (0, 2.0),
            (0, 6.0),
            (2, 5.0),
            (1, 4.0),
            (1, 4.0),
            (0, 0.5),
            (3, 5.0),
        ];
        for (i, &(class, strength)) in plan.iter().enumerate() {
            got.extend(d.push_window(&window(class, strength), i as f64));
        }
        got.extend(d.push_window(&[], 99.0));
        let names: Vec<&str> = got.iter().map(|g| g.label.as_str()).collect();
        // "yes" twice in a row is one detection (best at window 2); a weak "yes" (softmax
        // below the threshold) is none.
        assert_eq!(names, ["yes", "no"], "{got:?}");
        assert_eq!(got[0].time_s, 2.0);
    }
}
