//! A packed batch's rows cut per session: the slices that per-session work (a conv's
//! window, a scan's state) runs on in parallel.

use std::ops::Range;

/// `data`'s rows (`width` values each) cut at the segments' bounds, one slice a segment
/// (segments lie back to back from row 0, in order, as the models' `forward` takes them).
///
/// ```
/// use tideway_operators::layers::segments::rows_of;
/// let mut data = [0.0f32; 6];
/// let parts = rows_of(&mut data, &[0..1, 1..3], 2);
/// assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 4]);
/// ```
pub fn rows_of<'d>(
    mut data: &'d mut [f32],
    segments: &[Range<usize>],
    width: usize,
) -> Vec<&'d mut [f32]> {
    let mut next = 0;
    segments
        .iter()
        .map(|rows| {
            assert_eq!(rows.start, next, "segments lie back to back from row 0");
            next = rows.end;
            let (segment, rest) = std::mem::take(&mut data).split_at_mut(rows.len() * width);
            data = rest;
            segment
        })
        .collect()
}
