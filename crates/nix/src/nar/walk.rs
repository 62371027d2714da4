//! Reading a NAR that came from outside, entry by entry, in one pass.
//!
//! NARs reach the runner from builders (outputs) and from caches, so this
//! reader trusts nothing in them: every length is bounded before anything
//! is allocated (file contents are streamed, never held), directories must
//! be sorted and their names plain, nesting is bounded, padding must be
//! zero, and every error says after which byte it went wrong. (The
//! `nix-nar` crate's decoder allocates whatever a garbled length asks for,
//! which aborts the process.)

use std::io::{self, Read};

use super::NarError;

/// The longest string a NAR may hold outside file contents (a name, a
/// symlink target): Linux's `PATH_MAX`.
const MAX_STRING: u64 = 4096;
/// The deepest nesting of directories.
const MAX_DEPTH: usize = 256;

/// One entry of a NAR, as [`walk`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    Directory,
    Symlink {
        target: &'a str,
    },
    /// Its contents are the reader passed beside it.
    File {
        executable: bool,
        size: u64,
    },
}

/// Reads the whole NAR from `reader` and calls `visit` for every entry, in
/// order, with its path inside the NAR (`""` for the top, `a/b` below;
/// names that are not UTF-8 are shown lossily) and, for a file, a reader
/// of exactly its contents (what the visitor leaves unread is skipped).
/// Returns how many bytes the NAR had.
pub fn walk<R: Read, F>(reader: R, visit: F) -> Result<u64, NarError>
where
    F: FnMut(&str, Entry<'_>, &mut dyn Read) -> io::Result<()>,
{
    let mut w = Walker {
        r: reader,
        pos: 0,
        visit,
    };
    w.token(b"nix-archive-1")?;
    w.node(String::new(), 0)?;
    let mut rest = [0u8; 1];
    match w.r.read(&mut rest) {
        Ok(0) => Ok(w.pos),
        Ok(_) => Err(w.corrupt("data after the end of the archive")),
        Err(e) => Err(w.io(e)),
    }
}

struct Walker<R, F> {
    r: R,
    pos: u64,
    visit: F,
}

impl<R: Read, F> Walker<R, F>
where
    F: FnMut(&str, Entry<'_>, &mut dyn Read) -> io::Result<()>,
{
    fn corrupt(&self, what: impl std::fmt::Display) -> NarError {
        super::corrupt_at(self.pos, &what)
    }

    fn io(&self, e: io::Error) -> NarError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.corrupt("the archive ends early")
        } else {
            self.corrupt(e)
        }
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.r.read_exact(buf).map_err(|e| self.io(e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.exact(&mut b[..pad])?;
        if b.iter().any(|&x| x != 0) {
            return Err(self.corrupt("non-zero padding"));
        }
        Ok(())
    }

    /// A string other than file contents (bounded).
    fn string(&mut self) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(self.corrupt(format!(
                "a string of {len} bytes, more than the {MAX_STRING} a name or target may have"
            )));
        }
        let mut s = vec![0u8; len as usize];
        self.exact(&mut s)?;
        self.padding(len)?;
        Ok(s)
    }

    fn token(&mut self, want: &[u8]) -> Result<(), NarError> {
        let at = self.pos;
        let got = self.string()?;
        if got != want {
            return Err(super::corrupt_at(
                at,
                &format!(
                    "expected {:?}, found {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        Ok(())
    }

    fn visit(&mut self, path: &str, entry: Entry<'_>, data: &mut dyn Read) -> Result<(), NarError> {
        let at = self.pos;
        (self.visit)(path, entry, data).map_err(|e| super::corrupt_at(at, &e))
    }

    fn node(&mut self, path: String, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(format!("directories nested deeper than {MAX_DEPTH}")));
        }
        self.token(b"(")?;
        self.token(b"type")?;
        let kind = self.string()?;
        match kind.as_slice() {
            b"regular" => self.file(&path)?,
            b"symlink" => {
                self.token(b"target")?;
                let target = self.string()?;
                if target.is_empty() || target.contains(&0) {
                    return Err(self.corrupt("a symlink target that is empty or holds NUL"));
                }
                let target = String::from_utf8_lossy(&target).into_owned();
                self.visit(&path, Entry::Symlink { target: &target }, &mut io::empty())?;
                self.token(b")")?;
            }
            b"directory" => self.directory(&path, depth)?,
            other => {
                return Err(self.corrupt(format!(
                    "unknown entry type {:?}",
                    String::from_utf8_lossy(other)
                )));
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &str) -> Result<(), NarError> {
        let mut field = self.string()?;
        let mut executable = false;
        if field == b"executable" {
            executable = true;
            let at = self.pos;
            if !self.string()?.is_empty() {
                return Err(super::corrupt_at(at, &"the executable marker is not empty"));
            }
            field = self.string()?;
        }
        if field != b"contents" {
            return Err(self.corrupt(format!(
                "expected \"contents\", found {:?}",
                String::from_utf8_lossy(&field)
            )));
        }
        let size = self.u64()?;
        let start = self.pos;
        // The visitor reads what it wants of the contents; the rest is
        // skipped. Contents are never held whole here.
        let mut counted = CountingTake {
            inner: &mut self.r,
            left: size,
        };
        let visited = (self.visit)(path, Entry::File { executable, size }, &mut counted);
        let drained = io::copy(&mut counted, &mut io::sink());
        let left = counted.left;
        self.pos = start + (size - left);
        visited.map_err(|e| super::corrupt_at(start, &e))?;
        drained.map_err(|e| self.io(e))?;
        if left > 0 {
            return Err(self.corrupt("the archive ends inside a file"));
        }
        self.padding(size)?;
        self.token(b")")
    }

    fn directory(&mut self, path: &str, depth: usize) -> Result<(), NarError> {
        self.visit(path, Entry::Directory, &mut io::empty())?;
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let at = self.pos;
            let field = self.string()?;
            match field.as_slice() {
                b")" => return Ok(()),
                b"entry" => {}
                other => {
                    return Err(super::corrupt_at(
                        at,
                        &format!(
                            "expected \"entry\" or \")\", found {:?}",
                            String::from_utf8_lossy(other)
                        ),
                    ));
                }
            }
            self.token(b"(")?;
            self.token(b"name")?;
            let name_at = self.pos;
            let name = self.string()?;
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(super::corrupt_at(
                    name_at,
                    &format!("invalid entry name {:?}", String::from_utf8_lossy(&name)),
                ));
            }
            if previous.as_ref().is_some_and(|p| *p >= name) {
                return Err(super::corrupt_at(
                    name_at,
                    &"directory entries are not in order (or repeat a name)",
                ));
            }
            self.token(b"node")?;
            let name_text = String::from_utf8_lossy(&name);
            let child = if path.is_empty() {
                name_text.into_owned()
            } else {
                format!("{path}/{name_text}")
            };
            self.node(child, depth + 1)?;
            self.token(b")")?;
            previous = Some(name);
        }
    }
}

/// At most `left` bytes of `inner`.
struct CountingTake<'a, R> {
    inner: &'a mut R,
    left: u64,
}

impl<R: Read> Read for CountingTake<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(nar: &[u8]) -> Result<Vec<String>, NarError> {
        let mut seen = Vec::new();
        walk(nar, |path, entry, data| {
            let mut contents = Vec::new();
            data.read_to_end(&mut contents)?;
            seen.push(format!(
                "{path} {entry:?} {}",
                String::from_utf8_lossy(&contents)
            ));
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn a_tree_is_walked_in_order_with_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("a"), "x").unwrap();
        std::fs::write(t.join("sub/b"), "yy").unwrap();
        std::os::unix::fs::symlink("a", t.join("l")).unwrap();
        let nar = super::super::nar_bytes(&t).unwrap();
        assert_eq!(
            entries(&nar).unwrap(),
            [
                " Directory ",
                "a File { executable: false, size: 1 } x",
                "l Symlink { target: \"a\" } ",
                "sub Directory ",
                "sub/b File { executable: false, size: 2 } yy",
            ]
        );
    }

    #[test]
    fn a_huge_length_is_refused_before_anything_is_allocated() {
        let mut nar = super::super::single_file_nar(b"hello");
        // The length of the "(" token becomes 2^60.
        nar[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = entries(&nar).unwrap_err().to_string();
        assert!(err.contains("after byte 32"), "{err}");
        assert!(err.contains("more than the 4096"), "{err}");
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors_that_say_where() {
        let nar = super::super::single_file_nar(b"hello");
        let err = entries(&nar[..nar.len() - 3]).unwrap_err().to_string();
        assert!(err.contains("ends early"), "{err}");
        let mut longer = nar.clone();
        longer.push(0);
        let err = entries(&longer).unwrap_err().to_string();
        assert!(err.contains(&format!("after byte {}", nar.len())), "{err}");
    }
}
