//! NARs on the wire, both ways: a [`NarHeader`] describing the path, then
//! its bytes in chunks. Runner and builder use the same two halves.

use hydra_nix::daemon::{DaemonClient, DaemonError, PathInfo};
use hydra_nix::{Hash, HashAlgo, StoreDir};
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::v1::{NarChunk, NarHeader, nar_chunk};

/// Bytes per data chunk.
pub const CHUNK: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("bad store path: {0}")]
    BadPath(#[from] hydra_nix::store_path::StorePathError),
    #[error("bad NAR hash '{hash}': {message}")]
    BadHash { hash: String, message: String },
    #[error("the NAR hash must be SHA-256")]
    NotSha256,
}

impl NarHeader {
    /// The header announcing `info`'s NAR (machine and attempt left empty).
    pub fn describing(info: &PathInfo) -> NarHeader {
        NarHeader {
            store_path: info.path.clone(),
            nar_hash: info.nar_hash.to_prefixed_base32(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone().unwrap_or_default(),
            ca: info.ca.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// What the header announces, checked: store paths, a SHA-256 hash.
    pub fn path_info(&self, store: &StoreDir) -> Result<PathInfo, HeaderError> {
        store.parse_path(&self.store_path)?;
        for r in &self.references {
            store.parse_path(r)?;
        }
        let nar_hash = Hash::parse_prefixed(&self.nar_hash).map_err(|e| HeaderError::BadHash {
            hash: self.nar_hash.clone(),
            message: e.to_string(),
        })?;
        if nar_hash.algo != HashAlgo::Sha256 {
            return Err(HeaderError::NotSha256);
        }
        Ok(PathInfo {
            path: self.store_path.clone(),
            deriver: (!self.deriver.is_empty()).then(|| self.deriver.clone()),
            nar_hash,
            references: self.references.clone(),
            registration_time: 0,
            nar_size: self.nar_size,
            ultimate: false,
            signatures: Vec::new(),
            ca: (!self.ca.is_empty()).then(|| self.ca.clone()),
        })
    }
}

#[derive(Debug, Error)]
pub enum SendNarError {
    #[error("exporting the NAR: {0}")]
    Daemon(#[from] DaemonError),
    #[error("reading the NAR: {0}")]
    Io(#[from] std::io::Error),
    /// The receiving side of the channel went away (the peer ended the call).
    #[error("the receiver went away")]
    ReceiverGone,
}

/// Sends `header`, then the NAR of `info` exported from `client`, as
/// chunks into `tx` (each wrapped by `wrap` into the channel's item type).
pub async fn send_nar<T>(
    client: &mut DaemonClient,
    info: &PathInfo,
    header: NarHeader,
    tx: &mpsc::Sender<T>,
    wrap: impl Fn(NarChunk) -> T,
) -> Result<(), SendNarError> {
    let chunk = |part| NarChunk { part: Some(part) };
    tx.send(wrap(chunk(nar_chunk::Part::Header(header))))
        .await
        .map_err(|_| SendNarError::ReceiverGone)?;
    let (mut w, mut r) = tokio::io::duplex(CHUNK);
    let export = async {
        let res = client.export_nar(info, &mut w).await;
        drop(w);
        res.map_err(SendNarError::from)
    };
    let forward = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            tx.send(wrap(chunk(nar_chunk::Part::Data(buf[..n].to_vec()))))
                .await
                .map_err(|_| SendNarError::ReceiverGone)?;
        }
    };
    tokio::try_join!(export, forward).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_bad_ones_are_refused() {
        let info = PathInfo {
            path: "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello".into(),
            deriver: None,
            nar_hash: Hash::sha256(b"nar"),
            references: vec!["/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello".into()],
            registration_time: 0,
            nar_size: 3,
            ultimate: false,
            signatures: vec![],
            ca: None,
        };
        let store = StoreDir::default();
        let header = NarHeader::describing(&info);
        assert_eq!(header.path_info(&store).unwrap(), info);
        let bad_path = NarHeader {
            store_path: "/etc/passwd".into(),
            ..header.clone()
        };
        assert!(matches!(
            bad_path.path_info(&store),
            Err(HeaderError::BadPath(_))
        ));
        let bad_hash = NarHeader {
            nar_hash: "sha256:zzz".into(),
            ..header
        };
        assert!(matches!(
            bad_hash.path_info(&store),
            Err(HeaderError::BadHash { .. })
        ));
    }
}
