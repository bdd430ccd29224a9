//! Which rows of a packed batch a forward computes logits for: every row (scoring, the
//! protocol's per-token outputs), none (a rank without the head), or only each generating
//! session's last row — a prompt's next token needs one row of the head, where every row
//! costs `2 · rows · hidden · vocab` FLOPs (a third of a 130M Mamba's prefill) and, on a GPU,
//! a download of `rows · vocab` floats.

/// The rows whose logits a forward returns, in the batch's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows<'a> {
    /// No logits.
    None,
    /// Every row.
    All,
    /// Every row of session `i`, or only its last row where `last_only[i]`.
    LastOf(&'a [bool]),
}

impl LogitRows<'_> {
    /// Each session's rows of logits: `lens[i]`, or 1 where only its last is asked for (0 for
    /// an empty session), or `None` when no logits are asked for.
    pub fn counts(&self, lens: &[usize]) -> Option<Vec<usize>> {
        match self {
            LogitRows::None => None,
            LogitRows::All => Some(lens.to_vec()),
            LogitRows::LastOf(last_only) => Some(
                lens.iter()
                    .enumerate()
                    .map(|(i, &n)| match last_only.get(i) {
                        Some(true) => n.min(1),
                        _ => n,
                    })
                    .collect(),
            ),
        }
    }

    /// The batch rows to keep, in order, when they are fewer than all of them (`None`: every
    /// row, or no logits at all).
    pub fn subset(&self, lens: &[usize]) -> Option<Vec<usize>> {
        // Every decode step asks with all rows or one-row sessions: no list is built for them.
        let LogitRows::LastOf(last_only) = self else {
            return None;
        };
        let drops_rows = |(i, &n): (usize, &usize)| n > 1 && last_only.get(i) == Some(&true);
        if !lens.iter().enumerate().any(drops_rows) {
            return None;
        }
        let counts = self.counts(lens)?;
        let mut keep = Vec::with_capacity(counts.iter().sum());
        let mut start = 0;
        for (&n, &k) in lens.iter().zip(&counts) {
            keep.extend(start + n - k..start + n);
            start += n;
        }
        Some(keep)
    }

    /// Keeps `keep`'s rows (each `width` wide) of `values`, in order.
    pub fn gather(values: &[f32], width: usize, keep: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(keep.len() * width);
        for &row in keep {
            out.extend_from_slice(&values[row * width..(row + 1) * width]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_only_keeps_each_flagged_sessions_last_row() {
        let lens = [3, 1, 0, 2];
        let rows = LogitRows::LastOf(&[true, true, true, false]);
        assert_eq!(rows.counts(&lens), Some(vec![1, 1, 0, 2]));
        assert_eq!(rows.subset(&lens), Some(vec![2, 3, 4, 5]));
        assert_eq!(LogitRows::All.subset(&lens), None);
        assert_eq!(LogitRows::None.counts(&lens), None);
        // One-row sessions need no subset.
        assert_eq!(LogitRows::LastOf(&[true, true]).subset(&[1, 1]), None);
        let values: Vec<f32> = (0..12).map(|x| x as f32).collect();
        assert_eq!(
            LogitRows::gather(&values, 2, &[1, 5]),
            vec![2.0, 3.0, 10.0, 11.0]
        );
    }
}
