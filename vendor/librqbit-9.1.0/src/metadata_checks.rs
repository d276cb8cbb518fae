//! pool-helper patch: an info dictionary is checked before librqbit builds anything from it.
//!
//! librqbit-core's `Lengths` (called by `TorrentMetaV1Info::validate`) divides by the piece
//! length and counts pieces and 16 KiB chunks in `u32` without checks: an info dict with a piece
//! length of 0, or a total length of 2^50, panics there (division by zero, overflow) or wraps to
//! nonsense. Metadata resolved from a magnet comes from peers, so [`validate_info`] refuses such
//! dicts with an error first; the session calls it wherever stock librqbit called `validate()`.
//!
//! [`InfoValidator`]: the caller's own check of the raw info dict (pool-helper runs its metainfo
//! checks), run by the metadata reader once the bytes match the info-hash and before they are
//! parsed (`AddTorrentOptions::info_validator`).

use std::sync::Arc;

use librqbit_core::{
    constants::CHUNK_SIZE,
    torrent_metainfo::{TorrentMetaV1Info, ValidatedTorrentMetaV1Info},
};

/// A check of the raw bencoded info dictionary; an error refuses the metadata.
pub type InfoValidator = Arc<dyn Fn(&[u8]) -> anyhow::Result<()> + Send + Sync>;

/// Why an info dictionary's lengths were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadLengths {
    #[error("the info dictionary has a piece length of 0")]
    ZeroPieceLength,
    #[error("the info dictionary's file lengths add up to more than 2^64 bytes")]
    TotalOverflow,
    #[error("{total_length} bytes in pieces of {piece_length} are more than 2^32 - 1 pieces")]
    TooManyPieces {
        total_length: u64,
        piece_length: u32,
    },
    #[error(
        "{total_length} bytes in pieces of {piece_length} are more than 2^32 - 1 chunks of 16 KiB"
    )]
    TooManyChunks {
        total_length: u64,
        piece_length: u32,
    },
    #[error("'pieces' has {got} bytes, fewer than the {want} needed for {count} pieces")]
    PiecesTooShort { got: usize, want: u64, count: u64 },
}

/// Checks that `Lengths` can be built from `info` without overflow, and that `pieces` holds a
/// hash for every piece. Dicts that are malformed in other ways are left to `validate()`.
pub fn check_lengths<B: AsRef<[u8]>>(info: &TorrentMetaV1Info<B>) -> Result<(), BadLengths> {
    let total_length = match (info.length, info.files.as_ref()) {
        (Some(len), None) => len,
        (None, Some(files)) => files
            .iter()
            .try_fold(0u64, |acc, f| acc.checked_add(f.length))
            .ok_or(BadLengths::TotalOverflow)?,
        _ => return Ok(()),
    };
    if total_length == 0 {
        return Ok(()); // validate() refuses it with its own error
    }
    let piece_length = info.piece_length;
    if piece_length == 0 {
        return Err(BadLengths::ZeroPieceLength);
    }
    let pl = u64::from(piece_length);
    let count = total_length.div_ceil(pl);
    if count > u64::from(u32::MAX) {
        return Err(BadLengths::TooManyPieces {
            total_length,
            piece_length,
        });
    }
    let chunk = u64::from(CHUNK_SIZE);
    let last_len = total_length - (count - 1) * pl;
    let chunks = (count - 1) * pl.div_ceil(chunk) + last_len.div_ceil(chunk);
    if chunks > u64::from(u32::MAX) {
        return Err(BadLengths::TooManyChunks {
            total_length,
            piece_length,
        });
    }
    let got = info.pieces.as_ref().len();
    let want = count * 20;
    if (got as u64) < want {
        return Err(BadLengths::PiecesTooShort { got, want, count });
    }
    Ok(())
}

/// [`check_lengths`], then librqbit's own `validate()`.
pub fn validate_info<B: AsRef<[u8]>>(
    info: TorrentMetaV1Info<B>,
) -> anyhow::Result<ValidatedTorrentMetaV1Info<B>> {
    check_lengths(&info)?;
    Ok(info.validate()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use buffers::ByteBuf;

    /// A single-file info dict as bencode, `pieces` of `pieces_len` bytes.
    fn info_bytes(length: u64, piece_length: u64, pieces_len: usize) -> Vec<u8> {
        let mut b = format!(
            "d6:lengthi{length}e4:name1:x12:piece lengthi{piece_length}e6:pieces{pieces_len}:"
        )
        .into_bytes();
        b.extend(std::iter::repeat_n(b'a', pieces_len));
        b.push(b'e');
        b
    }

    fn validate(bytes: &[u8]) -> anyhow::Result<()> {
        let info: TorrentMetaV1Info<ByteBuf> =
            bencode::from_bytes(bytes).map_err(|e| e.into_kind())?;
        validate_info(info).map(|_| ())
    }

    #[test]
    fn a_piece_length_of_zero_is_an_error_not_a_division_by_zero() {
        let e = validate(&info_bytes(65536, 0, 80)).unwrap_err();
        assert_eq!(
            e.downcast_ref(),
            Some(&BadLengths::ZeroPieceLength),
            "{e:#}"
        );
    }

    #[test]
    fn a_length_of_2_pow_50_is_an_error_not_an_overflow() {
        for pl in [16384u64, 1 << 26] {
            let e = validate(&info_bytes(1 << 50, pl, 20)).unwrap_err();
            assert!(e.downcast_ref::<BadLengths>().is_some(), "{pl}: {e:#}");
        }
    }

    #[test]
    fn a_piece_length_of_2_pow_40_is_an_error() {
        assert!(validate(&info_bytes(1 << 20, 1 << 40, 20)).is_err());
    }

    #[test]
    fn file_lengths_that_overflow_when_added_are_an_error() {
        let b = format!(
            "d5:filesld6:lengthi{m}e4:pathl1:aeed6:lengthi{m}e4:pathl1:beee4:name1:x12:piece lengthi16384e6:pieces20:{p}e",
            m = u64::MAX / 2 + 1,
            p = "a".repeat(20)
        );
        let e = validate(b.as_bytes()).unwrap_err();
        assert_eq!(e.downcast_ref(), Some(&BadLengths::TotalOverflow), "{e:#}");
    }

    #[test]
    fn too_few_piece_hashes_are_an_error() {
        let e = validate(&info_bytes(65536, 16384, 60)).unwrap_err();
        assert!(
            matches!(e.downcast_ref(), Some(BadLengths::PiecesTooShort { .. })),
            "{e:#}"
        );
    }

    #[test]
    fn a_sound_info_dict_passes_also_with_stock_librqbits_extra_hash() {
        validate(&info_bytes(65536, 16384, 80)).unwrap();
        validate(&info_bytes(65536, 16384, 100)).unwrap();
        validate(&info_bytes(65537, 16384, 100)).unwrap();
    }
}
