//! The worker protocol's wire format: little-endian u64s, and byte strings
//! as a u64 length, the bytes, and zero padding to a multiple of 8.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::DaemonError;

/// The longest string the client accepts: a garbled length must not make
/// it allocate gigabytes.
const MAX_STRING: u64 = 64 << 20;

pub async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, DaemonError> {
    Ok(r.read_u64_le().await?)
}

pub async fn read_bool<R: AsyncRead + Unpin>(r: &mut R) -> Result<bool, DaemonError> {
    Ok(read_u64(r).await? != 0)
}

pub async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, DaemonError> {
    let len = read_u64(r).await?;
    if len > MAX_STRING {
        return Err(DaemonError::Protocol(format!(
            "string of {len} bytes exceeds the limit"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    let pad = (8 - (len % 8) as usize) % 8;
    let mut padding = [0u8; 8];
    r.read_exact(&mut padding[..pad]).await?;
    if padding.iter().any(|&b| b != 0) {
        return Err(DaemonError::Protocol("non-zero string padding".into()));
    }
    Ok(buf)
}

pub async fn read_string<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, DaemonError> {
    String::from_utf8(read_bytes(r).await?)
        .map_err(|_| DaemonError::Protocol("string is not UTF-8".into()))
}

/// A string meant for people (a log line, an error message): Nix passes
/// on whatever bytes a build printed, so invalid UTF-8 is replaced rather
/// than refused.
pub async fn read_text<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, DaemonError> {
    Ok(String::from_utf8_lossy(&read_bytes(r).await?).into_owned())
}

pub async fn read_strings<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<String>, DaemonError> {
    let n = read_u64(r).await?;
    if n > MAX_STRING {
        return Err(DaemonError::Protocol(format!(
            "list of {n} items exceeds the limit"
        )));
    }
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        out.push(read_string(r).await?);
    }
    Ok(out)
}

pub async fn write_u64<W: AsyncWrite + Unpin>(w: &mut W, v: u64) -> Result<(), DaemonError> {
    Ok(w.write_u64_le(v).await?)
}

pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> Result<(), DaemonError> {
    write_u64(w, b.len() as u64).await?;
    w.write_all(b).await?;
    let pad = (8 - b.len() % 8) % 8;
    w.write_all(&[0u8; 8][..pad]).await?;
    Ok(())
}

pub async fn write_strings<W, I, S>(w: &mut W, items: I) -> Result<(), DaemonError>
where
    W: AsyncWrite + Unpin,
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<str>,
{
    let items = items.into_iter();
    write_u64(w, items.len() as u64).await?;
    for s in items {
        write_bytes(w, s.as_ref().as_bytes()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn strings_are_padded_to_eight_bytes() {
        let mut buf = Vec::new();
        write_bytes(&mut buf, b"abc").await.unwrap();
        assert_eq!(
            buf,
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
        assert_eq!(read_string(&mut buf.as_slice()).await.unwrap(), "abc");
    }

    #[tokio::test]
    async fn a_huge_length_is_a_protocol_error_not_an_allocation() {
        let buf = u64::MAX.to_le_bytes();
        assert!(matches!(
            read_bytes(&mut buf.as_slice()).await,
            Err(DaemonError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn garbage_padding_is_rejected() {
        let mut buf = Vec::new();
        write_bytes(&mut buf, b"a").await.unwrap();
        buf[10] = 1;
        assert!(matches!(
            read_bytes(&mut buf.as_slice()).await,
            Err(DaemonError::Protocol(_))
        ));
    }
}
