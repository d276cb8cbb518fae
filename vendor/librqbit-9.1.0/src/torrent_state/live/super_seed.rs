//! pool-helper patch: super-seeding (BEP 16) for a seed that starts a swarm.
//!
//! A seed that advertises every piece lets each leecher ask it for anything; leechers that do
//! not know what the others are fetching then ask for the same pieces, and the origin uploads
//! several copies before the swarm holds one. In super-seeding mode the seed sends no bitfield.
//! It offers each peer a few pieces with HAVE messages, choosing the pieces the swarm has least
//! of (offered least often, then held by the fewest peers as their HAVEs tell), and offers the
//! next one when an offered piece has been uploaded to that peer or the peer announces it got it
//! elsewhere. Until every piece has been offered once, no piece is offered twice, so the origin
//! uploads about one copy while the leechers trade the rest among themselves.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::piece_availability::PieceAvailability;

/// Torrent-wide: how often each piece was offered, and how many offers a peer may have open.
pub(crate) struct SuperSeed {
    offered: Box<[AtomicU32]>,
    slots: usize,
}

impl SuperSeed {
    /// `piece_length` sets how many pieces a peer may have offered and not yet delivered:
    /// enough for 512 KiB in flight, at least 2.
    pub fn new(total_pieces: usize, piece_length: u32) -> Self {
        let slots = (512 * 1024 / piece_length.max(1) as usize).max(2);
        Self { offered: (0..total_pieces).map(|_| AtomicU32::new(0)).collect(), slots }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The piece to offer next to a peer: one it lacks and was not offered, offered least
    /// often so far, then held by the fewest peers; ties at random.
    pub fn pick(
        &self,
        peer: &PeerOffers,
        peer_has: impl Fn(usize) -> bool,
        availability: &PieceAvailability,
    ) -> Option<u32> {
        use rand::RngExt;
        let mut rng = rand::rng();
        let offered_to_peer = peer.offered.lock();
        let mut best: Option<((u32, u32), usize)> = None;
        let mut ties = 0u32;
        for (i, count) in self.offered.iter().enumerate() {
            if offered_to_peer.contains(&(i as u32)) || peer_has(i) {
                continue;
            }
            let score = (count.load(Ordering::Relaxed), availability.get(i));
            match best {
                Some((b, _)) if score > b => {}
                Some((b, _)) if score == b => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((score, i));
                    }
                }
                _ => {
                    best = Some((score, i));
                    ties = 1;
                }
            }
        }
        let (_, i) = best?;
        Some(i as u32)
    }

    pub fn mark_offered(&self, peer: &PeerOffers, piece: u32) {
        if let Some(c) = self.offered.get(piece as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        peer.offered.lock().insert(piece);
        peer.open.lock().insert(piece);
    }
}

/// Per connection: what this peer was offered, and which offers are still open (offered, not
/// yet uploaded to it nor announced by it).
#[derive(Default)]
pub(crate) struct PeerOffers {
    offered: Mutex<HashSet<u32>>,
    open: Mutex<HashSet<u32>>,
    last_progress: Mutex<Option<Instant>>,
    pub changed: Notify,
}

impl PeerOffers {
    pub fn open_count(&self) -> usize {
        self.open.lock().len()
    }

    /// The offer of `piece` is closed (uploaded, or the peer has it); frees a slot.
    pub fn close(&self, piece: u32) {
        if self.open.lock().remove(&piece) {
            *self.last_progress.lock() = Some(Instant::now());
            self.changed.notify_waiters();
        }
    }

    /// No offer closed for `d`: the peer is not taking what it was offered (a client that
    /// ignores some HAVEs). The caller then offers one more so that it is never stuck.
    pub fn stalled_for(&self, d: Duration) -> bool {
        let mut last = self.last_progress.lock();
        match *last {
            Some(t) if t.elapsed() < d => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_is_offered_once_before_any_twice() {
        let ss = SuperSeed::new(16, 256 * 1024);
        let av = PieceAvailability::new(16);
        let peers: Vec<PeerOffers> = (0..3).map(|_| PeerOffers::default()).collect();
        let mut seen = HashSet::new();
        for round in 0..16 {
            let p = &peers[round % 3];
            let piece = ss.pick(p, |_| false, &av).expect("a piece to offer");
            assert!(seen.insert(piece), "piece {piece} offered twice in the first round");
            ss.mark_offered(p, piece);
        }
        // Now every piece was offered once; a peer is offered only what it was not offered.
        let piece = ss.pick(&peers[0], |_| false, &av).expect("a second-round piece");
        assert!(!peers[0].offered.lock().contains(&piece));
    }

    #[test]
    fn prefers_pieces_fewest_peers_hold_and_skips_what_the_peer_has() {
        let ss = SuperSeed::new(3, 16384);
        let av = PieceAvailability::new(3);
        av.inc(0);
        av.inc(0);
        av.inc(1);
        let p = PeerOffers::default();
        assert_eq!(ss.pick(&p, |_| false, &av), Some(2));
        assert_eq!(ss.pick(&p, |i| i == 2, &av), Some(1));
        assert_eq!(ss.pick(&p, |_| true, &av), None);
    }

    #[test]
    fn slots_cover_half_a_mebibyte() {
        assert_eq!(SuperSeed::new(1, 32 * 1024).slots(), 16);
        assert_eq!(SuperSeed::new(1, 4 << 20).slots(), 2);
    }

    #[test]
    fn closing_frees_a_slot_once() {
        let ss = SuperSeed::new(4, 16384);
        let p = PeerOffers::default();
        ss.mark_offered(&p, 1);
        assert_eq!(p.open_count(), 1);
        p.close(1);
        p.close(1);
        assert_eq!(p.open_count(), 0);
    }
}
