//! Gzip for large pages, deflated on every core at once.
//!
//! A `/metrics` page of 1,000 bots is about 5 MB, and deflating it was a
//! third of the render (BENCHMARKS.md, issue 22): on one core, the scrape
//! waited for it. So a large page is cut into pieces deflated side by side
//! the way pigz does it, each piece ended with a sync flush (an empty
//! stored block that ends on a byte boundary and does not end the stream),
//! so that the pieces laid end to end are one deflate stream, in one gzip
//! member with the whole page's CRC. Readers that stop after the first
//! member (Chromium, zlib's `inflate`, `flate2::read::GzDecoder`) read it
//! all. Each piece starts without the previous piece's last 32 KiB as a
//! dictionary: with pieces of a megabyte or more that costs well under a
//! percent of the size.

use flate2::{Compress, Compression, FlushCompress, Status};

/// Pieces are at least this large: below it, the threads cost more than
/// they save, and the ratio lost at each cut starts to show.
const MIN_PIECE: usize = 1 << 20;

/// The gzip header: magic, deflate, no flags, no time, "fastest" (level 1),
/// unknown OS: what flate2's `GzEncoder` writes at level 1.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff];

/// `body` gzip-compressed at level 1 as one member, deflated in pieces on
/// up to `threads` threads (the calling thread one of them). `None` only if
/// the deflater reports an error, which a well-formed input never causes.
pub fn compress(body: &[u8], threads: usize) -> Option<Vec<u8>> {
    // Twice as many pieces as threads, so that a thread that runs late
    // leaves its share to the others (`share`).
    let pieces = match threads {
        0 | 1 => 1,
        _ => (body.len() / MIN_PIECE).clamp(1, 2 * threads),
    };
    let size = body.len().div_ceil(pieces).max(1);
    let chunks: Vec<&[u8]> = if body.is_empty() {
        vec![body]
    } else {
        body.chunks(size).collect()
    };
    let last = chunks.len() - 1;
    let deflated = crate::share::share(
        chunks.into_iter().enumerate().collect(),
        threads,
        |(i, chunk)| piece(chunk, i == last),
    );
    let mut out = Vec::with_capacity(
        HEADER.len()
            + 8
            + deflated
                .iter()
                .flatten()
                .map(|(d, _)| d.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(&HEADER);
    let mut crc = crc32fast::Hasher::new();
    for piece in deflated {
        let (bytes, piece_crc) = piece?;
        out.extend_from_slice(&bytes);
        crc.combine(&piece_crc);
    }
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952).
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    Some(out)
}

/// One piece as raw deflate: sync-flushed so the next piece can follow it,
/// or finished if it is the last. With its CRC, for the member's trailer.
fn piece(input: &[u8], last: bool) -> Option<(Vec<u8>, crc32fast::Hasher)> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(input);
    let mut deflate = Compress::new(Compression::fast(), false);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(input.len() / 4 + 64);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity() / 2 + 64);
        }
        let read = deflate.total_in() as usize;
        let status = deflate.compress_vec(&input[read..], &mut out, flush).ok()?;
        let done = deflate.total_in() as usize == input.len();
        match status {
            Status::StreamEnd => return Some((out, crc)),
            // A sync flush is complete once all input is in and the
            // deflater left room in the output: it had nothing more to say.
            Status::Ok | Status::BufError if !last && done && out.len() < out.capacity() => {
                return Some((out, crc));
            }
            Status::Ok | Status::BufError => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A page-like text: repetitive lines with varying numbers, so it
    /// compresses about as a real exposition does.
    fn page(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 100);
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(
                format!(
                    "bot_messages_total{{bot=\"bot{}\",role=\"user\"}} {}\n",
                    i % 997,
                    i.wrapping_mul(2_654_435_761) % 100_000
                )
                .as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// Read with a decoder that stops after the first member, so a page
    /// that came out as several members would read short and fail.
    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn pieces_read_back_as_one_member() {
        for len in [
            0,
            1,
            100,
            MIN_PIECE - 1,
            MIN_PIECE,
            2 * MIN_PIECE - 1,
            2 * MIN_PIECE,
            2 * MIN_PIECE + 1,
            5_000_000,
        ] {
            let body = page(len);
            for threads in [1, 2, 3, 4] {
                let gz = compress(&body, threads).expect("compresses");
                assert_eq!(gunzip(&gz), body, "len {len}, {threads} threads");
                let mut whole = flate2::read::MultiGzDecoder::new(&gz[..]);
                let mut again = Vec::new();
                whole.read_to_end(&mut again).expect("valid gzip");
                assert_eq!(again, body, "len {len}, {threads} threads, multi");
            }
        }
    }

    #[test]
    fn incompressible_pieces_read_back() {
        // Random bytes grow a little when deflated: the output buffer must
        // grow past its first guess without losing a byte.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let body: Vec<u8> = (0..3 * MIN_PIECE + 7)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let gz = compress(&body, 4).expect("compresses");
        assert_eq!(gunzip(&gz), body);
    }

    #[test]
    fn cutting_costs_little_ratio() {
        let body = page(5_000_000);
        let one = compress(&body, 1).expect("compresses").len();
        let four = compress(&body, 4).expect("compresses").len();
        assert!(
            four.abs_diff(one) * 100 < one,
            "four pieces {four} B, one {one} B"
        );
    }
}
