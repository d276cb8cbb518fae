use std::{net::SocketAddr, sync::Arc};

use bencode::from_bytes;
use buffers::{ByteBuf, ByteBufOwned};
use bytes::Bytes;
use librqbit_core::{
    constants::CHUNK_SIZE,
    hash_id::Id20,
    lengths::{ChunkInfo, last_element_size},
    torrent_metainfo::TorrentMetaV1Info,
};
use parking_lot::{Mutex, RwLock};
use peer_binary_protocol::{
    Handshake, Message,
    extended::{
        ExtendedMessage,
        handshake::ExtendedHandshake,
        ut_metadata::{UtMetadata, UtMetadataData},
    },
};
use sha1w::{ISha1, Sha1};
use tokio::sync::mpsc::UnboundedSender;
use tracing::trace;

use crate::{
    metadata_checks::InfoValidator,
    peer_connection::{
        PeerConnection, PeerConnectionHandler, PeerConnectionOptions, WriterRequest,
    },
    spawn_utils::BlockingSpawner,
    stream_connect::{ConnectionKind, StreamConnector},
};

pub(crate) async fn read_metainfo_from_peer(
    addr: SocketAddr,
    peer_id: Id20,
    info_hash: Id20,
    peer_connection_options: Option<PeerConnectionOptions>,
    spawner: BlockingSpawner,
    connector: Arc<StreamConnector>,
    client_name_and_version: String,
    info_validator: Option<InfoValidator>,
) -> anyhow::Result<TorrentAndInfoBytes> {
    let (result_tx, result_rx) =
        tokio::sync::oneshot::channel::<anyhow::Result<TorrentAndInfoBytes>>();
    let (writer_tx, writer_rx) = tokio::sync::mpsc::unbounded_channel::<WriterRequest>();
    let handler = Handler {
        addr,
        info_hash,
        writer_tx,
        result_tx: Mutex::new(Some(result_tx)),
        locked: RwLock::new(None),
        client_name_and_version,
        info_validator,
    };
    let connection = PeerConnection::new(
        addr,
        info_hash,
        peer_id,
        handler,
        peer_connection_options,
        spawner,
        connector,
    );

    let result_reader = result_rx;
    let (_, brx) = tokio::sync::broadcast::channel(1);
    let connection_runner = async move { connection.manage_peer_outgoing(writer_rx, brx).await };

    tokio::select! {
        result = result_reader => Ok(result??),
        whatever = connection_runner => match whatever {
            Ok(_) => anyhow::bail!("connection runner completed first"),
            Err(e) => Err(e.into())
        }
    }
}

/// pool-helper patch: the caller's [`InfoValidator`] refused metadata that matched the
/// info-hash. Every peer would send the same bytes, so the whole resolution fails with it.
#[derive(Debug, thiserror::Error)]
#[error("the metadata matching the info-hash was refused")]
pub(crate) struct MetadataRefused(#[source] pub anyhow::Error);

#[derive(Default)]
struct HandlerLocked {
    metadata_size: u32,
    total_pieces: usize,
    buffer: Vec<u8>,
    received_pieces: Vec<bool>,
}

impl HandlerLocked {
    fn new(metadata_size: u32) -> anyhow::Result<Self> {
        // pool-helper patch: an empty info dict cannot be valid; without this, no piece would ever
        // be requested and the connection would idle until it timed out.
        if metadata_size == 0 {
            anyhow::bail!("peer announced a metadata size of 0");
        }
        if metadata_size > 32 * 1024 * 1024 {
            anyhow::bail!("metadata size {} is too big", metadata_size);
        }
        let buffer = vec![0u8; metadata_size as usize];
        let total_pieces: usize = (metadata_size as u64)
            .div_ceil(CHUNK_SIZE as u64)
            .try_into()?;
        let received_pieces = vec![false; total_pieces];
        Ok(Self {
            metadata_size,
            received_pieces,
            buffer,
            total_pieces,
        })
    }
    fn piece_size(&self, index: u32) -> usize {
        // pool-helper patch: no unwrap (the last piece is at most CHUNK_SIZE bytes).
        if index as usize + 1 == self.total_pieces {
            last_element_size(self.metadata_size, CHUNK_SIZE) as usize
        } else {
            CHUNK_SIZE as usize
        }
    }
    fn record_piece(
        &mut self,
        d: &UtMetadataData<ByteBuf>,
        info_hash: &Id20,
    ) -> anyhow::Result<bool> {
        let piece = d.piece();
        if piece as usize >= self.total_pieces {
            anyhow::bail!("wrong index");
        }
        let offset = (piece * CHUNK_SIZE) as usize;
        let size = self.piece_size(piece);
        if d.len() != size {
            anyhow::bail!(
                "expected length of piece {} to be {}, but got {}",
                piece,
                size,
                d.len()
            );
        }
        if self.received_pieces[piece as usize] {
            anyhow::bail!("already received piece {}", piece);
        }
        d.copy_to_slice(&mut self.buffer[offset..offset + d.len()]);
        self.received_pieces[piece as usize] = true;

        if self.received_pieces.iter().all(|p| *p) {
            // check metadata
            let mut hash = Sha1::new();
            hash.update(&self.buffer);
            if hash.finish() != info_hash.0 {
                anyhow::bail!("info checksum invalid");
            }
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

pub type TorrentAndInfoBytes = (TorrentMetaV1Info<ByteBufOwned>, ByteBufOwned);

struct Handler {
    addr: SocketAddr,
    info_hash: Id20,
    writer_tx: UnboundedSender<WriterRequest>,
    result_tx: Mutex<Option<tokio::sync::oneshot::Sender<anyhow::Result<TorrentAndInfoBytes>>>>,
    locked: RwLock<Option<HandlerLocked>>,
    client_name_and_version: String,
    info_validator: Option<InfoValidator>,
}

impl PeerConnectionHandler for Handler {
    fn should_send_bitfield(&self) -> bool {
        false
    }

    fn serialize_bitfield_message_to_buf(&self, _buf: &mut [u8]) -> anyhow::Result<usize> {
        Ok(0)
    }

    fn on_handshake(&self, handshake: Handshake, _kind: ConnectionKind) -> anyhow::Result<()> {
        if !handshake.supports_extended() {
            anyhow::bail!(
                "this peer does not support extended handshaking, which is a prerequisite to download metadata"
            )
        }
        Ok(())
    }

    async fn on_received_message(&self, msg: Message<'_>) -> anyhow::Result<()> {
        trace!("{}: received message: {:?}", self.addr, msg);

        if let Message::Extended(ExtendedMessage::UtMetadata(UtMetadata::Data(utdata))) = msg {
            // pool-helper patch: a data message before the extended handshake (which sets up
            // `locked`) is the peer's error, not a panic (stock librqbit unwrapped here).
            let buffer = {
                let mut g = self.locked.write();
                let Some(locked) = g.as_mut() else {
                    anyhow::bail!("peer sent ut_metadata data before its extended handshake");
                };
                if !locked.record_piece(&utdata, &self.info_hash)? {
                    return Ok(());
                }
                g.take().map(|l| l.buffer).unwrap_or_default()
            };
            let buf = Bytes::from(buffer);
            // pool-helper patch: the caller's check of the raw info dict, before it is parsed.
            let info = match &self.info_validator {
                Some(v) => v(&buf).map_err(|e| MetadataRefused(e).into()),
                None => Ok(()),
            }
            .and_then(|()| {
                from_bytes::<TorrentMetaV1Info<ByteBuf>>(&buf)
                    .map(|i| {
                        use clone_to_owned::CloneToOwned;
                        i.clone_to_owned(Some(&buf))
                    })
                    .map_err(|e| {
                        trace!("error deserializing TorrentMetaV1Info: {e:#}");
                        e.into_kind().into()
                    })
            })
            .map(|i| (i, ByteBufOwned(buf.clone())));

            self.result_tx
                .lock()
                .take()
                .ok_or_else(|| anyhow::anyhow!("oneshot is consumed"))?
                .send(info)
                .map_err(|_| anyhow::anyhow!("torrent info deserialized, but consumer closed"))?;
        }
        Ok(())
    }

    fn on_uploaded_bytes(&self, _bytes: u32) {}

    fn read_chunk(&self, _chunk: &ChunkInfo, _buf: &mut [u8]) -> anyhow::Result<()> {
        anyhow::bail!("the peer is not supposed to be requesting chunks")
    }

    fn on_extended_handshake(
        &self,
        extended_handshake: &ExtendedHandshake<ByteBuf>,
    ) -> anyhow::Result<()> {
        let metadata_size = match extended_handshake.metadata_size {
            Some(metadata_size) => metadata_size,
            None => anyhow::bail!("peer does not have metadata_size"),
        };

        if extended_handshake.m.ut_metadata.is_none() {
            anyhow::bail!("peer does not support ut_metadata");
        }

        self.writer_tx
            .send(WriterRequest::Message(Message::Unchoke))?;
        self.writer_tx
            .send(WriterRequest::Message(Message::Interested))?;

        let inner = HandlerLocked::new(metadata_size)?;
        let total_pieces = inner.total_pieces;

        self.locked.write().replace(inner);

        for i in 0..total_pieces {
            self.writer_tx
                .send(WriterRequest::Message(Message::Extended(
                    ExtendedMessage::UtMetadata(UtMetadata::Request(i.try_into()?)),
                )))?;
        }
        Ok(())
    }

    fn should_transmit_have(&self, _id: librqbit_core::lengths::ValidPieceIndex) -> bool {
        false
    }

    fn client_name_and_version(&self) -> &str {
        &self.client_name_and_version
    }
}

// pool-helper patch: what a peer sends while we read metadata from it is an error for that peer,
// never a panic (docs/pool-helper.md, "librqbit 9.1: how pool-helper uses it").
#[cfg(test)]
mod tests {
    use super::*;

    type ResultRx = tokio::sync::oneshot::Receiver<anyhow::Result<TorrentAndInfoBytes>>;

    fn handler_for(
        info_hash: Id20,
        info_validator: Option<InfoValidator>,
    ) -> (
        Handler,
        tokio::sync::mpsc::UnboundedReceiver<WriterRequest>,
        ResultRx,
    ) {
        let (writer_tx, writer_rx) = tokio::sync::mpsc::unbounded_channel();
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let h = Handler {
            addr: "127.0.0.1:1".parse().unwrap(),
            info_hash,
            writer_tx,
            result_tx: Mutex::new(Some(result_tx)),
            locked: RwLock::new(None),
            client_name_and_version: "test".into(),
            info_validator,
        };
        (h, writer_rx, result_rx)
    }

    fn handler() -> (
        Handler,
        tokio::sync::mpsc::UnboundedReceiver<WriterRequest>,
        ResultRx,
    ) {
        handler_for(Id20::new([7u8; 20]), None)
    }

    fn extended_handshake(metadata_size: u32) -> ExtendedHandshake<ByteBuf<'static>> {
        let mut hs = ExtendedHandshake::new();
        hs.m.ut_metadata = Some(1);
        hs.metadata_size = Some(metadata_size);
        hs
    }

    fn data(piece: u32, total_size: u32, bytes: &[u8]) -> Message<'_> {
        Message::Extended(ExtendedMessage::UtMetadata(UtMetadata::Data(
            UtMetadataData::from_bytes(piece, total_size, ByteBuf(bytes)),
        )))
    }

    #[tokio::test]
    async fn metadata_data_before_the_extended_handshake_is_an_error_not_a_panic() {
        let (h, _rx, _res) = handler();
        let e = h
            .on_received_message(data(0, 5, b"d1:ae"))
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("before its extended handshake"),
            "{e:#}"
        );
    }

    #[test]
    fn a_metadata_size_of_zero_is_an_error() {
        let (h, _rx, _res) = handler();
        assert!(h.on_extended_handshake(&extended_handshake(0)).is_err());
    }

    #[tokio::test]
    async fn metadata_refused_by_the_validator_is_never_parsed_and_ends_with_metadata_refused() {
        // Nested 10,000 deep: stock librqbit would parse it (bencode has a depth cap, but the
        // caller's own checks come first now).
        let info = [vec![b'l'; 10_000], vec![b'e'; 10_000]].concat();
        let mut sha = Sha1::new();
        sha.update(&info);
        let validator: InfoValidator = Arc::new(|b: &[u8]| {
            anyhow::ensure!(b.first() == Some(&b'd'), "not a dictionary");
            Ok(())
        });
        let (h, _rx, res) = handler_for(Id20::new(sha.finish()), Some(validator));
        h.on_extended_handshake(&extended_handshake(info.len() as u32))
            .unwrap();
        h.on_received_message(data(0, info.len() as u32, &info[..16384]))
            .await
            .unwrap();
        h.on_received_message(data(1, info.len() as u32, &info[16384..]))
            .await
            .unwrap();
        let e = res.await.unwrap().unwrap_err();
        assert!(e.downcast_ref::<MetadataRefused>().is_some(), "{e:#}");
        assert_eq!(
            format!("{e:#}"),
            "the metadata matching the info-hash was refused: not a dictionary"
        );
    }

    #[test]
    fn a_peer_message_with_an_integer_too_big_for_its_field_is_an_error_not_a_panic() {
        // An extended handshake whose reqq (u32) overflows even u64: the vendored bencode's
        // checked parsing (stock: "attempt to multiply with overflow" with overflow checks on).
        for payload in [
            &b"d4:reqqi99999999999999999999ee"[..],
            &b"d4:reqqi4294967296ee"[..],
            &b"d1:md11:ut_metadatai1ee13:metadata_sizei99999999999999999999ee"[..],
            &b"d99999999999999999999:xi1ee"[..],
        ] {
            let mut msg = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
            msg.extend([20u8, 0]);
            msg.extend_from_slice(payload);
            assert!(
                Message::deserialize(&msg, &[]).is_err(),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }
}
