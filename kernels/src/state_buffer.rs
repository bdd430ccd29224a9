//! Buffers for sessions' recurrent state, packed together on huge pages.
//!
//! A decode step reads and writes every session's state in every layer once: at batch 32 a
//! mamba-130m step streams 75 MB of SSM states and 18 MB of conv windows, each session's
//! share of a layer 96 KB and 24 KB. On 4 KiB pages each buffer spans dozens of pages, each a
//! TLB miss and the end of a hardware prefetcher's stream; from the heap they also lie
//! scattered between other allocations. [`StateBuffer`]s are instead carved one after another
//! from regions mapped on 2 MiB pages ([`HugeBuffer`]): `examples/scan_step.rs` with every
//! session's state in one such region, alternated with states from the heap (2026-12-04, Zen
//! 4): 32 sessions 6.70 → 5.63 ms, 8 sessions 1.96 → 1.65.
//!
//! A dropped buffer goes back to a free list of its size and the next state of that size
//! takes it: a model's sessions all have the same sizes, so memory is reused as sessions come
//! and go, and is kept by the process (as an allocator keeps its heap) rather than given back.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::huge_pages::HugeBuffer;

/// Bytes mapped at a time: 21 mamba-130m sessions' states. A buffer larger than this gets a
/// region of its own.
const REGION_BYTES: usize = 64 << 20;

/// Every buffer starts on a cache line, so that SIMD loads of its lines never split.
const ALIGN: usize = 64;

/// An owned, fixed-length run of f32 zeros (when made) for one session's state in one layer,
/// packed with other states on huge pages where the OS gives them. Reads as a slice.
pub struct StateBuffer {
    start: NonNull<f32>,
    len: usize,
}

// SAFETY: a buffer owns its cells alone (the arena hands each out once until it is dropped),
// as a `Vec<f32>` does.
unsafe impl Send for StateBuffer {}
unsafe impl Sync for StateBuffer {}

impl StateBuffer {
    /// `len` zeros, written when made: a fresh page that is read first maps the kernel's
    /// shared zero page, and its first store then takes a copy-on-write fault that flushes
    /// the TLB of every core running the process (an inter-processor interrupt, a VM exit on
    /// a virtual machine). With 1000 fresh sessions of the 130M Mamba those faults took 73%
    /// of a serving process's time (BENCHMARKS.md, "Serving at 100 and 1000 streams").
    pub fn zeroed(len: usize) -> Self {
        let buffer = Self::taken(len);
        // SAFETY: the buffer's `len` cells are its own and in bounds.
        unsafe { std::ptr::write_bytes(buffer.start.as_ptr(), 0, len) };
        buffer
    }

    /// A buffer holding a copy of `values`.
    pub fn copy_of(values: &[f32]) -> Self {
        let buffer = Self::taken(values.len());
        // SAFETY: the buffer's `len` cells are its own, in bounds, and apart from `values`.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), buffer.start.as_ptr(), values.len())
        };
        buffer
    }

    /// `len` cells from the arena, their content whatever it was (the caller writes them all).
    fn taken(len: usize) -> Self {
        if len == 0 {
            return StateBuffer {
                start: NonNull::dangling(),
                len,
            };
        }
        let address = ARENA
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take(bytes_of(len));
        StateBuffer {
            start: NonNull::new(address as *mut f32).expect("regions are not at address 0"),
            len,
        }
    }
}

/// The bytes a buffer of `len` values takes in a region: whole cache lines.
fn bytes_of(len: usize) -> usize {
    (len * std::mem::size_of::<f32>()).next_multiple_of(ALIGN)
}

impl Drop for StateBuffer {
    fn drop(&mut self) {
        if self.len > 0 {
            ARENA
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .give_back(self.start.as_ptr() as usize, bytes_of(self.len));
        }
    }
}

impl Deref for StateBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `start` holds `len` initialised cells that this buffer owns (or is dangling
        // with `len` 0).
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl DerefMut for StateBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`, through the unique borrow of the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }
}

impl Clone for StateBuffer {
    fn clone(&self) -> Self {
        Self::copy_of(self)
    }
}

impl Default for StateBuffer {
    fn default() -> Self {
        Self::taken(0)
    }
}

impl PartialEq for StateBuffer {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for StateBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The process's state memory: the regions mapped so far, the unused end of the newest, and
/// the buffers given back, by size.
struct Arena {
    regions: Vec<HugeBuffer<u8>>,
    /// Address and bytes of the newest region's part not handed out yet.
    next: usize,
    left: usize,
    free: BTreeMap<usize, Vec<usize>>,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    regions: Vec::new(),
    next: 0,
    left: 0,
    free: BTreeMap::new(),
});

impl Arena {
    /// The address of `bytes` (a multiple of [`ALIGN`]) that no buffer holds: one given back
    /// at that size, else the next of the newest region, else the start of a new region (the
    /// newest one's rest, less than `bytes`, stays unused).
    fn take(&mut self, bytes: usize) -> usize {
        if let Some(address) = self.free.get_mut(&bytes).and_then(Vec::pop) {
            return address;
        }
        if bytes > self.left {
            let region = HugeBuffer::<u8>::zeroed(REGION_BYTES.max(bytes + ALIGN));
            let start = region.as_ptr() as usize;
            // A mapped region starts on a huge page; one on the heap (no mapping) may not.
            self.next = start.next_multiple_of(ALIGN);
            self.left = region.len() - (self.next - start);
            self.regions.push(region);
        }
        let address = self.next;
        self.next += bytes;
        self.left -= bytes;
        address
    }

    fn give_back(&mut self, address: usize, bytes: usize) {
        self.free.entry(bytes).or_default().push(address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeros_then_their_own_and_reused_once_dropped() {
        // The last is a third of a region: the third round needs a new one.
        let lens = [0usize, 1, 15, 16, 17, 24_576, REGION_BYTES / 3 / 4];
        let mut buffers: Vec<StateBuffer> = Vec::new();
        for round in 0..3 {
            for (i, &len) in lens.iter().enumerate() {
                let mut buffer = StateBuffer::zeroed(len);
                assert_eq!(buffer.len(), len);
                assert!(
                    buffer.iter().all(|&v| v == 0.0),
                    "round {round}, {len} values"
                );
                if len > 0 {
                    assert_eq!(buffer.as_ptr() as usize % ALIGN, 0);
                }
                buffer.fill((round * 10 + i) as f32);
                buffers.push(buffer);
            }
            // Every buffer still holds its own value: none overlaps another.
            for (b, buffer) in buffers.iter().enumerate() {
                let want = ((b / lens.len()) * 10 + b % lens.len()) as f32;
                assert!(buffer.iter().all(|&v| v == want), "buffer {b}");
            }
        }
        let copy = buffers[5].clone();
        assert_eq!(copy, buffers[5]);
        assert_ne!(copy.as_ptr(), buffers[5].as_ptr());
        // A dropped buffer's cells go to the next buffer of its size, zeroed again.
        let address = buffers[5].as_ptr();
        buffers.remove(5);
        let again = StateBuffer::zeroed(lens[5]);
        assert_eq!(again.as_ptr(), address);
        assert!(again.iter().all(|&v| v == 0.0));
        assert_eq!(
            format!("{:?}", StateBuffer::copy_of(&[1.5, -2.0])),
            "[1.5, -2.0]"
        );
    }
}
