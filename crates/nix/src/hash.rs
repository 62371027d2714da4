//! Hashes as Nix prints and parses them (`sha256:<base32>`, base16, SRI).

use std::fmt;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;

use crate::base32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("hash {0:?} has no algorithm prefix")]
    MissingAlgo(String),
    #[error("hash {hash:?} has the wrong length for {algo}")]
    WrongLength { algo: HashAlgo, hash: String },
    #[error("hash {0:?} is not valid base16, base32 or base64")]
    BadEncoding(String),
}

impl HashAlgo {
    pub fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    pub fn parse(s: &str) -> Result<Self, HashError> {
        Ok(match s {
            "md5" => HashAlgo::Md5,
            "sha1" => HashAlgo::Sha1,
            "sha256" => HashAlgo::Sha256,
            "sha512" => HashAlgo::Sha512,
            other => return Err(HashError::UnknownAlgo(other.to_owned())),
        })
    }

    pub fn digest(self, data: &[u8]) -> Hash {
        let bytes = match self {
            HashAlgo::Md5 => Md5::digest(data).to_vec(),
            HashAlgo::Sha1 => Sha1::digest(data).to_vec(),
            HashAlgo::Sha256 => Sha256::digest(data).to_vec(),
            HashAlgo::Sha512 => Sha512::digest(data).to_vec(),
        };
        Hash { algo: self, bytes }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    pub algo: HashAlgo,
    pub bytes: Vec<u8>,
}

impl Hash {
    pub fn sha256(data: impl AsRef<[u8]>) -> Hash {
        HashAlgo::Sha256.digest(data.as_ref())
    }

    /// Parses `algo:digest` (base16, base32 or base64) or SRI `algo-base64`.
    pub fn parse_prefixed(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, digest)) = s.split_once(':') {
            return Self::parse_digest(HashAlgo::parse(algo)?, digest);
        }
        if let Some((algo, digest)) = s.split_once('-')
            && let Ok(algo) = HashAlgo::parse(algo)
        {
            return Self::parse_digest(algo, digest);
        }
        Err(HashError::MissingAlgo(s.to_owned()))
    }

    /// Parses a digest of a known algorithm in any of Nix's encodings,
    /// told apart by length as Nix does.
    pub fn parse_digest(algo: HashAlgo, digest: &str) -> Result<Hash, HashError> {
        let size = algo.size();
        let bytes = if digest.len() == size * 2 {
            hex::decode(digest).map_err(|_| HashError::BadEncoding(digest.to_owned()))?
        } else if digest.len() == base32::encoded_len(size) {
            base32::decode(digest).map_err(|_| HashError::BadEncoding(digest.to_owned()))?
        } else if digest.len() == size.div_ceil(3) * 4 {
            // Base64 of `size` bytes: the padding must be there, or the
            // digits would decode to more bytes than the algorithm has.
            decode_base64(digest)
                .filter(|b| b.len() == size)
                .ok_or_else(|| HashError::BadEncoding(digest.to_owned()))?
        } else {
            return Err(HashError::WrongLength {
                algo,
                hash: digest.to_owned(),
            });
        };
        Ok(Hash { algo, bytes })
    }

    pub fn to_base16(&self) -> String {
        hex::encode(&self.bytes)
    }

    pub fn to_base32(&self) -> String {
        base32::encode(&self.bytes)
    }

    /// `sha256:<base16>`, the form Nix hashes into store paths.
    pub fn to_prefixed_base16(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// `sha256:<base32>`, the form `nix-store -q --hash` prints.
    pub fn to_prefixed_base32(&self) -> String {
        format!("{}:{}", self.algo, self.to_base32())
    }

    /// Folds the hash into `size` bytes by XOR, as Nix's `compressHash`.
    pub fn compress(&self, size: usize) -> Vec<u8> {
        let mut out = vec![0u8; size];
        for (i, b) in self.bytes.iter().enumerate() {
            out[i % size] ^= b;
        }
        out
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().take_while(|&c| c != b'=') {
        let v = TABLE.iter().position(|&t| t == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_encoding_of_the_same_hash() {
        let h = Hash::sha256(b"");
        let b16 = h.to_prefixed_base16();
        let b32 = h.to_prefixed_base32();
        let sri = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        assert_eq!(Hash::parse_prefixed(&b16).unwrap(), h);
        assert_eq!(Hash::parse_prefixed(&b32).unwrap(), h);
        assert_eq!(Hash::parse_prefixed(sri).unwrap(), h);
    }

    #[test]
    fn rejects_unknown_algorithms_and_lengths() {
        assert!(matches!(
            Hash::parse_prefixed("sha3:00"),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_prefixed("sha256:00"),
            Err(HashError::WrongLength { .. })
        ));
        assert!(matches!(
            Hash::parse_prefixed("abc"),
            Err(HashError::MissingAlgo(_))
        ));
        // 44 base64 digits without padding are 33 bytes, not a SHA-256
        // (the fuzzer found this one).
        assert!(matches!(
            Hash::parse_digest(
                HashAlgo::Sha256,
                "3b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            ),
            Err(HashError::BadEncoding(_))
        ));
    }
}
