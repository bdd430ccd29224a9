//! A scan of a `torch.save` archive's pickles before candle reads them: every length-prefixed
//! opcode's length must fit in what is left of its pickle. candle-core 0.11's reader allocates
//! a buffer of the length a file states before reading it (`pickle.rs`, `BinUnicode`), so a
//! 408-byte file could ask for 4 GiB (found by fuzz/fuzz_targets/pth.rs; FUZZING.md).
//!
//! Opcodes and argument sizes: CPython's `Lib/pickletools.py`. The scan stops at the first
//! opcode it does not know (candle then refuses it) and at STOP.

use std::io::Read;
use std::path::Path;

/// Checks every `*.pkl` entry of the zip archive at `path`; the error says which entry, the
/// offset and the length asked for.
pub fn check_pickle_lengths(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.into_owned();
        if !name.ends_with(".pkl") {
            continue;
        }
        let mut bytes = Vec::new();
        // A pickle of a state_dict is small (names and storage keys, not the tensors).
        // The stated lengths first (the zip reader checks the entry's CRC only at its end,
        // after handing over its bytes), then the entry's own integrity.
        let read = (&mut entry).take(64 << 20).read_to_end(&mut bytes);
        scan(&bytes).map_err(|e| format!("{name}: {e}"))?;
        read.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Walks the opcodes of one pickle.
fn scan(pickle: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    while at < pickle.len() {
        let opcode = pickle[at];
        let start = at;
        at += 1;
        // A little-endian length of `width` bytes, then that many bytes.
        let counted = |width: usize, at: &mut usize| -> Result<(), String> {
            let field = pickle
                .get(*at..*at + width)
                .ok_or_else(|| format!("opcode {opcode:#04x} at byte {start}: truncated"))?;
            let mut len = [0u8; 8];
            len[..width].copy_from_slice(field);
            let len = u64::from_le_bytes(len);
            *at += width;
            let left = (pickle.len() - *at) as u64;
            if len > left {
                return Err(format!(
                    "opcode {opcode:#04x} at byte {start} states {len} bytes but {left} are left"
                ));
            }
            *at += len as usize;
            Ok(())
        };
        match opcode {
            b'.' => return Ok(()), // STOP
            // Length-prefixed: BINSTRING, BINBYTES, BINUNICODE, LONG4 (4 bytes); SHORT_BINSTRING,
            // SHORT_BINBYTES, SHORT_BINUNICODE, LONG1 (1 byte); BINUNICODE8, BINBYTES8,
            // BYTEARRAY8 (8 bytes).
            b'T' | b'B' | b'X' | 0x8b => counted(4, &mut at)?,
            b'U' | b'C' | 0x8c | 0x8a => counted(1, &mut at)?,
            0x8d | 0x8e | 0x96 => counted(8, &mut at)?,
            // Fixed-size arguments.
            b'J' | b'j' | b'r' | 0x84 => at += 4, // BININT, LONG_BINGET, LONG_BINPUT, EXT4
            b'K' | b'h' | b'q' | 0x82 | 0x80 => at += 1, // BININT1, BINGET, BINPUT, EXT1, PROTO
            b'M' | 0x83 => at += 2,               // BININT2, EXT2
            b'G' | 0x95 => at += 8,               // BINFLOAT, FRAME
            // Newline-terminated arguments: one line, or two (GLOBAL, INST).
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => at = line_end(pickle, at),
            b'c' | b'i' => at = line_end(pickle, line_end(pickle, at)),
            // No argument.
            b'(' | b')' | b']' | b'}' | b'a' | b'e' | b's' | b'u' | b't' | b'l' | b'd' | b'0'
            | b'1' | b'2' | b'N' | b'R' | b'b' | b'o' | b'Q' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88
            | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 | 0x93 | 0x94 | 0x97 | 0x98 => {}
            // Unknown: candle's reader refuses it.
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// The position after the next newline at or after `at` (the end if none).
fn line_end(pickle: &[u8], at: usize) -> usize {
    pickle
        .get(at..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(pickle.len(), |i| at + i + 1)
}

#[cfg(test)]
mod tests {
    use super::scan;

    #[test]
    fn lengths_past_the_end_are_refused() {
        // PROTO 2, BINUNICODE of 3 bytes "abc", STOP.
        assert_eq!(scan(b"\x80\x02X\x03\x00\x00\x00abc."), Ok(()));
        // BINUNICODE stating 1195853639 bytes with 3 left.
        let e = scan(b"\x80\x02X\x47\x47\x47\x47abc.").unwrap_err();
        assert!(e.contains("states 1195853639 bytes but 4 are left"), "{e}");
        // SHORT_BINUNICODE, a GLOBAL's two lines, BINPUT, then a truncated BINBYTES8.
        let e = scan(b"\x8c\x01ac__main__\nf\nq\x01\x8e\x01\x00").unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
