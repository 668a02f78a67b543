//! Opening input files: plain or gzip-compressed, told apart by their
//! first bytes (not their name), so `replay`, `plot` and `import-torch`
//! read `trace.jsonl.gz` as they read `trace.jsonl`; and writing outputs
//! compressed when their name ends in `.gz`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::Context;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

/// gzip's magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Whether `path`'s first bytes are gzip's.
fn is_gzip(file: &mut BufReader<File>) -> io::Result<bool> {
    Ok(file.fill_buf()?.starts_with(&GZIP_MAGIC))
}

/// A buffered reader of `path`, decompressed if it is gzip.
pub fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut file = BufReader::with_capacity(1 << 20, file);
    if is_gzip(&mut file).with_context(|| format!("cannot read {}", path.display()))? {
        Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            MultiGzDecoder::new(file),
        )))
    } else {
        Ok(Box::new(file))
    }
}

/// The whole of `path`, decompressed if it is gzip.
pub fn read_all(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    open(path)?
        .read_to_end(&mut out)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(out)
}

/// A buffered writer of `path` (created or truncated), gzip-compressed if
/// its name ends in `.gz`. Call `flush` and check it: dropping the
/// writer finishes the gzip stream but loses its errors.
pub fn create(path: &Path) -> anyhow::Result<Box<dyn Write>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let w = BufWriter::with_capacity(1 << 20, file);
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(GzWriter(Some(GzEncoder::new(
            w,
            Compression::default(),
        )))))
    } else {
        Ok(Box::new(w))
    }
}

/// A gzip encoder whose `flush` also finishes the stream (once), so that
/// callers need not know whether they write compressed.
struct GzWriter<W: Write>(Option<GzEncoder<W>>);

impl<W: Write> Write for GzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(e) => e.write(buf),
            None => Err(io::Error::other("write after the gzip stream was finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.take() {
            Some(e) => e.finish()?.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_read_by_content_and_written_by_name() {
        let dir = std::env::temp_dir().join(format!("inflight-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gz = dir.join("t.jsonl.gz");
        let mut w = create(&gz).unwrap();
        w.write_all(b"hello\nworld\n").unwrap();
        w.flush().unwrap();
        drop(w);
        assert_eq!(std::fs::read(&gz).unwrap()[..2], GZIP_MAGIC);
        // Read back under a name that does not say gzip.
        let renamed = dir.join("t.jsonl");
        std::fs::rename(&gz, &renamed).unwrap();
        assert_eq!(read_all(&renamed).unwrap(), b"hello\nworld\n");
        let plain = dir.join("p.txt");
        let mut w = create(&plain).unwrap();
        w.write_all(b"plain").unwrap();
        w.flush().unwrap();
        drop(w);
        assert_eq!(read_all(&plain).unwrap(), b"plain");
        assert!(open(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
