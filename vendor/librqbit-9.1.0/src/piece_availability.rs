//! pool-helper patch: how many live peers have each piece, for rarest-first piece selection.
//!
//! Stock librqbit picks pieces in file order. In a swarm that fetches one file at the same moment
//! (a master reaching many hosts) every leecher then wants the same pieces, has nothing to trade,
//! and the origin uploads about one copy per leecher. Rarest-first (BEP 3's recommendation, what
//! libtorrent and aria2 do) makes leechers fetch from the origin the pieces nobody else has yet,
//! and everything else from each other.
//!
//! The counts are atomics so that they can be kept on every bitfield change without taking the
//! torrent lock: a peer's bitfield arrives (`PeerStates::update_bitfield`), grows by a HAVE
//! (`on_have`), or leaves with the peer (`Peer::set_state` / `Peer::destroy` out of `Live`).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::type_aliases::BF;

#[derive(Debug, Default)]
pub struct PieceAvailability(Box<[AtomicU32]>);

impl PieceAvailability {
    pub fn new(total_pieces: usize) -> Self {
        Self((0..total_pieces).map(|_| AtomicU32::new(0)).collect())
    }

    /// Live peers known to have piece `index`.
    pub fn get(&self, index: usize) -> u32 {
        self.0.get(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// One more peer has piece `index` (a HAVE for a piece it did not have).
    pub fn inc(&self, index: usize) {
        if let Some(c) = self.0.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A peer's bitfield starts counting.
    pub fn add(&self, bf: &BF) {
        for i in bf.iter_ones() {
            self.inc(i);
        }
    }

    /// A peer's bitfield stops counting (replaced, or the peer left).
    pub fn remove(&self, bf: &BF) {
        for i in bf.iter_ones() {
            if let Some(c) = self.0.get(i) {
                // Never below zero, even if an update was missed.
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(bits: &[bool]) -> BF {
        let mut b = BF::from_boxed_slice(vec![0u8; bits.len().div_ceil(8)].into_boxed_slice());
        for (i, v) in bits.iter().enumerate() {
            b.set(i, *v);
        }
        b
    }

    #[test]
    fn counts_follow_bitfields_and_haves() {
        let a = PieceAvailability::new(3);
        a.add(&bf(&[true, false, true]));
        a.add(&bf(&[true, false, false]));
        a.inc(1);
        assert_eq!((a.get(0), a.get(1), a.get(2)), (2, 1, 1));
        a.remove(&bf(&[true, false, true]));
        assert_eq!((a.get(0), a.get(1), a.get(2)), (1, 1, 0));
        a.remove(&bf(&[false, false, true]));
        assert_eq!(a.get(2), 0, "never below zero");
        assert_eq!(a.get(7), 0, "out of range is 0");
    }
}
