//! Weight buffers on 2 MiB pages where the OS gives them (Linux's transparent huge pages,
//! asked for with `madvise(MADV_HUGEPAGE)`), so that a decode step streaming its weights
//! crosses a page every 2 MiB instead of every 4 KiB.
//!
//! A batch-1 step reads every weight once: ~520 MB for mamba-130m in f32, ~126k pages of 4
//! KiB, far more than the TLB holds (Zen 4's L2 TLB: 3072 entries, 12 MiB), so each new
//! page costs a page walk while the stream waits. Most distributions leave transparent huge
//! pages to `madvise` (`/sys/kernel/mm/transparent_hugepage/enabled`), so a `Vec` stays on
//! 4 KiB pages. Where the advice is refused or the OS has none, the buffer is an ordinary
//! zeroed mapping (or heap memory off Linux) and everything works the same, a little slower.
//! `TIDEWAY_SMALL_PAGES` set (to anything) keeps every buffer on the heap's pages: for
//! comparing (`examples/step_products.rs`), or where huge pages are unwelcome.
//!
//! Weights are carved from shared chunks ([`HugeBuffer::packed`]), so that small tensors and
//! the tails of large ones are on huge pages too.
//!
//! A mamba-130m decode step's products at batch 1, both kinds alternated step by step in one
//! process (`examples/step_products.rs`, 2026-12-04, Zen 4), 4 KiB → huge pages: f32 median
//! 17.83 → 17.20 and 17.31 → 16.70 ms, bf16 9.53 → 9.26 and 8.78 → 8.33, int8 5.74 → 5.53
//! and 4.43 → 4.46 (int8's tensors hold the fewest whole huge pages).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

/// Huge pages' size on x86-64 and most aarch64 kernels; a mapping is aligned to it.
const HUGE_PAGE: usize = 2 << 20;

/// Buffers smaller than this stay on the heap: they hold no whole huge page.
const MIN_BYTES: usize = HUGE_PAGE;

/// The mappings [`HugeBuffer::packed`] carves weights from: 32 huge pages.
const CHUNK_BYTES: usize = 32 * HUGE_PAGE;

/// Weights larger than this get a mapping of their own from [`HugeBuffer::packed`] (a
/// chunk would hold fewer than four of them).
const MAX_CARVED_BYTES: usize = CHUNK_BYTES / 4;

/// Where a carved buffer starts in its chunk: a page boundary, as a mapping's start.
const CARVE_ALIGN: usize = 4 << 10;

/// A fixed-length buffer of `T`, zeroed when made, on huge pages where the OS gives them.
///
/// `T` must be plain data for which all-zero bytes are a valid value (the numeric lanes of
/// weights); [`HugeBuffer::zeroed`] says so by its `Zeroable` bound.
pub struct HugeBuffer<T: Zeroable> {
    storage: Storage<T>,
    len: usize,
}

enum Storage<T> {
    /// An anonymous mapping with the advice given; the values start `offset` bytes in (the
    /// first 2 MiB boundary).
    #[cfg(target_os = "linux")]
    Mapped {
        map: memmap2::MmapMut,
        offset: usize,
    },
    /// Part of a chunk shared with other weights, from `offset` bytes in.
    #[cfg(target_os = "linux")]
    Carved {
        chunk: Arc<Chunk>,
        offset: usize,
    },
    Heap(Box<[T]>),
}

/// A mapping of [`CHUNK_BYTES`] from a 2 MiB boundary, advised to be huge, handed out front
/// to back in disjoint parts (never twice: a part is zeros until its buffer writes it) and
/// unmapped when the last of its buffers is dropped.
#[cfg(target_os = "linux")]
struct Chunk {
    /// Unmapped when the chunk is dropped; reached through `start`.
    _map: memmap2::MmapMut,
    /// The 2 MiB boundary in `map`.
    start: *mut u8,
}

// SAFETY: `start` points into `map`, which the chunk owns; each buffer carved from it
// reads and writes only its own disjoint part, through its own borrows.
#[cfg(target_os = "linux")]
unsafe impl Send for Chunk {}
// SAFETY: as for `Send`; the chunk itself is never written through a shared borrow.
#[cfg(target_os = "linux")]
unsafe impl Sync for Chunk {}

/// The chunk weights are carved from now, and how many of its bytes are handed out. Held
/// weakly: a chunk whose weights are all dropped is unmapped, and the next weight starts
/// a new one.
#[cfg(target_os = "linux")]
static CARVING: Mutex<(Weak<Chunk>, usize)> = Mutex::new((Weak::new(), 0));

/// Types whose all-zero bytes are a valid value, [`Zeroable::ZERO`].
///
/// # Safety
/// All-zero bytes must be a valid value of the type, equal to `ZERO`: a mapped buffer's
/// fresh pages are read as such.
pub unsafe trait Zeroable: Copy + Send + Sync + 'static {
    const ZERO: Self;
}

macro_rules! zeroable {
    ($($t:ty),*) => {$(
        // SAFETY: zero bytes are the number zero.
        unsafe impl Zeroable for $t {
            const ZERO: Self = 0 as $t;
        }
    )*};
}
zeroable!(u8, i8, u16, u32, i32, f32);

// SAFETY: an array of zeroable values is zeroable.
unsafe impl<T: Zeroable, const N: usize> Zeroable for [T; N] {
    const ZERO: Self = [T::ZERO; N];
}

impl<T: Zeroable> HugeBuffer<T> {
    /// `len` zeros. The pages are mapped as they are first written, which is when the OS
    /// picks their size: fill the buffer in place rather than copying a finished one in.
    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(storage) = Self::mapped(len) {
            return HugeBuffer { storage, len };
        }
        HugeBuffer {
            storage: Storage::Heap(vec![T::ZERO; len].into_boxed_slice()),
            len,
        }
    }

    /// A copy of `values`, written into fresh pages.
    pub fn copy_of(values: &[T]) -> Self {
        let mut buffer = Self::zeroed(values.len());
        buffer.copy_from_slice(values);
        buffer
    }

    /// A copy of weights `values`, in a [`HugeBuffer::packed`] buffer.
    pub fn packed_copy_of(values: &[T]) -> Self {
        let mut buffer = Self::packed(values.len());
        buffer.copy_from_slice(values);
        buffer
    }

    /// `len` zeros for a model's weights, which live as long as the model: up to
    /// `MAX_CARVED_BYTES`, a part of a mapping shared with the weights made before and
    /// after it, so that a small tensor (mamba-130m's `x_proj` and `dt_proj`) and the tail
    /// of a larger one past its last whole huge page sit on huge pages too; larger, as
    /// [`HugeBuffer::zeroed`]. A chunk is unmapped when all its weights are dropped, so
    /// weights dropped early (a model's scratch copies) keep their chunk's memory until
    /// then: not for buffers that come and go (session states have their own regions).
    ///
    /// With `zeroed`, mamba-130m f32 kept 69 MB of its 517 on 4 KiB pages (`AnonHugePages`
    /// 448 MB; 510 MB packed), which the floor's loop reads ~25% slower
    /// (`examples/floors.rs`). `tideway bench --batches 1` (Intel Xeon, 2026-12-05, the two
    /// builds alternated, tok/s): 58.6, 58.9, 60.5, 60.9, 61.8 → 61.1, 61.5, 62.0, 63.8,
    /// 64.1; peak RSS 654 → 662 MB. (On AMD's Zen 4, 2026-12-04, whole huge pages for
    /// every buffer, each its own mapping, had measured the same, at 146 MB more RSS.)
    pub fn packed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(storage) = Self::carved(len) {
            return HugeBuffer { storage, len };
        }
        Self::zeroed(len)
    }

    /// A part of the carving chunk for `len` values, or of a new chunk where it does not
    /// fit; `None` for an empty or large buffer, with `TIDEWAY_SMALL_PAGES` set, or when
    /// the OS refuses the mapping.
    #[cfg(target_os = "linux")]
    fn carved(len: usize) -> Option<Storage<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0
            || bytes > MAX_CARVED_BYTES
            || std::mem::align_of::<T>() > CARVE_ALIGN
            || std::env::var_os("TIDEWAY_SMALL_PAGES").is_some()
        {
            return None;
        }
        let mut carving = CARVING.lock().unwrap_or_else(|e| e.into_inner());
        let (current, used) = &mut *carving;
        let chunk = match current.upgrade() {
            Some(chunk) if *used + bytes <= CHUNK_BYTES => chunk,
            _ => {
                let mut map = memmap2::MmapMut::map_anon(CHUNK_BYTES + HUGE_PAGE).ok()?;
                let offset =
                    (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
                let _ = map.advise_range(memmap2::Advice::HugePage, offset, CHUNK_BYTES);
                // SAFETY: `offset + CHUNK_BYTES` lies within the mapping.
                let start = unsafe { map.as_mut_ptr().add(offset) };
                let chunk = Arc::new(Chunk { _map: map, start });
                (*current, *used) = (Arc::downgrade(&chunk), 0);
                chunk
            }
        };
        let offset = *used;
        *used = (offset + bytes).next_multiple_of(CARVE_ALIGN);
        Some(Storage::Carved { chunk, offset })
    }

    /// An anonymous mapping for `len` values from a 2 MiB boundary, its whole huge pages
    /// advised to be huge; `None` for a buffer under [`MIN_BYTES`], with
    /// `TIDEWAY_SMALL_PAGES` set, or when the OS refuses the mapping (the caller falls back
    /// to the heap).
    /// The tail past the last whole huge page keeps 4 KiB pages: a huge one there would hold
    /// up to 2 MiB of nothing (~1 MiB a tensor, a sixth of an int8 mamba-130m). A refused
    /// advice is not an error: the pages are then 4 KiB.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<Storage<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if bytes < MIN_BYTES || std::env::var_os("TIDEWAY_SMALL_PAGES").is_some() {
            return None;
        }
        let map = memmap2::MmapMut::map_anon(bytes + HUGE_PAGE).ok()?;
        let offset = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
        let whole = bytes / HUGE_PAGE * HUGE_PAGE;
        let _ = map.advise_range(memmap2::Advice::HugePage, offset, whole);
        Some(Storage::Mapped { map, offset })
    }
}

impl<T: Zeroable> Deref for HugeBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.storage {
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping holds `offset + len` values' bytes from a page boundary
            // (aligned for any `T` up to 4 KiB), zeroed by the OS and written only as `T`.
            Storage::Mapped { map, offset } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset).cast(), self.len)
            },
            #[cfg(target_os = "linux")]
            // SAFETY: the chunk holds `len` values' bytes from `offset`, a page boundary,
            // handed to this buffer alone, zeroed by the OS and written only as `T`.
            Storage::Carved { chunk, offset } => unsafe {
                std::slice::from_raw_parts(chunk.start.add(*offset).cast(), self.len)
            },
            Storage::Heap(values) => values,
        }
    }
}

impl<T: Zeroable> DerefMut for HugeBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            #[cfg(target_os = "linux")]
            // SAFETY: as for `deref`, through the unique borrow of the mapping.
            Storage::Mapped { map, offset } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().add(*offset).cast(), self.len)
            },
            #[cfg(target_os = "linux")]
            // SAFETY: as for `deref`; no other buffer reaches this part of the chunk, and
            // this one only through its unique borrow.
            Storage::Carved { chunk, offset } => unsafe {
                std::slice::from_raw_parts_mut(chunk.start.add(*offset).cast(), self.len)
            },
            Storage::Heap(values) => values,
        }
    }
}

impl<T: Zeroable + std::fmt::Debug> std::fmt::Debug for HugeBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeBuffer")
            .field("len", &self.len)
            .field("mapped", &!matches!(self.storage, Storage::Heap(_)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_zeros_then_what_is_written_at_every_size() {
        // Empty, on the heap, and mapped (over MIN_BYTES), each with a length that is not a
        // whole number of pages.
        for len in [
            0usize,
            1,
            1000,
            MIN_BYTES / 4 - 1,
            MIN_BYTES / 4 + 3,
            3 * HUGE_PAGE / 4 + 5,
        ] {
            let mut buffer = HugeBuffer::<u32>::zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0), "{len} values");
            for (i, v) in buffer.iter_mut().enumerate() {
                *v = i as u32 ^ 0x5a5a;
            }
            let values: Vec<u32> = (0..len as u32).map(|i| i ^ 0x5a5a).collect();
            assert_eq!(&*buffer, &values[..]);
            assert_eq!(&*HugeBuffer::copy_of(&values), &values[..]);
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn packed_buffers_hold_zeros_apart_from_each_other_on_page_boundaries() {
        // Small ones, one past a chunk's remainder, and one too large to carve.
        let lens = [
            1usize,
            1000,
            300_000,
            MAX_CARVED_BYTES / 4,
            3,
            MAX_CARVED_BYTES,
        ];
        let mut buffers: Vec<HugeBuffer<u32>> = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            let mut buffer = HugeBuffer::<u32>::packed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0), "{len} values");
            assert_eq!(buffer.as_ptr() as usize % CARVE_ALIGN, 0);
            let carved = matches!(buffer.storage, Storage::Carved { .. });
            assert_eq!(carved, len * 4 <= MAX_CARVED_BYTES, "{len} values");
            buffer
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = (i * 7 + b) as u32);
            buffers.push(buffer);
        }
        // Each still holds what it was given after all were written: no two overlap.
        for (b, buffer) in buffers.iter().enumerate() {
            assert!(
                buffer
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v == (i * 7 + b) as u32)
            );
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_chunk_is_unmapped_with_its_last_buffer() {
        let buffer = HugeBuffer::<f32>::packed(1000);
        let Storage::Carved { chunk, .. } = &buffer.storage else {
            panic!("a small weight is carved");
        };
        let chunk = Arc::downgrade(chunk);
        let other = HugeBuffer::<f32>::packed(1000);
        drop(buffer);
        // Other tests may carve from the same chunk at the same time: wait for theirs.
        drop(other);
        for _ in 0..1000 {
            if chunk.upgrade().is_none() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the chunk outlived its buffers");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn large_buffers_start_on_a_huge_page_boundary() {
        let buffer = HugeBuffer::<f32>::zeroed(HUGE_PAGE);
        assert!(matches!(buffer.storage, Storage::Mapped { .. }));
        assert_eq!(buffer.as_ptr() as usize % HUGE_PAGE, 0);
    }
}
