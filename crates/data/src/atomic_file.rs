//! Files that appear whole or not at all.
//!
//! Every file starflow writes (arrays, checkpoints, tables, figures, run state) goes through here: the
//! bytes go to a temporary file `.NAME.PID.tmp` in the target's directory, which is fsynced, renamed
//! over the target and made durable by an fsync of the directory. A crash or a full disk leaves
//! either the previous file or the new one, never a truncated one, and an unfinished temporary file
//! is removed. New files get mode 0644 (less the umask), like any file a user creates.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// A file being written; it replaces `path` on [`AtomicFile::commit`] and vanishes if dropped.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (its directory must exist).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = open_new(&tmp).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle to the temporary file, for a writer that must own its output (Parquet). Bytes
    /// written through it land after those written so far through `self`, which are flushed first.
    pub fn handle(&mut self) -> std::io::Result<File> {
        let w = self.writer.as_mut().expect("not yet committed");
        w.flush()?;
        w.get_ref().try_clone()
    }

    /// Flushes, fsyncs, renames over the target and fsyncs the directory.
    pub fn commit(self) -> Result<()> {
        self.commit_after(|_| {})
    }

    /// [`AtomicFile::commit`] with a call between the fsync and the rename (the complete temporary
    /// file exists, the target is still the old one): the test hook of training's checkpoint pause.
    pub fn commit_after(mut self, before_rename: impl FnOnce(&Path)) -> Result<()> {
        let writer = self.writer.take().expect("committed once");
        let result = (|| {
            let file = writer.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            before_rename(&self.path);
            std::fs::rename(&self.tmp, &self.path)?;
            sync_dir(&self.path);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.map_err(|source| DataError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.as_mut().expect("not yet committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.as_mut().expect("not yet committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically through `fill`, which may write in pieces (a large array streamed in
/// chunks) and may fail, leaving any previous file untouched.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    let writer = file.writer.as_mut().expect("just created");
    fill(writer).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    file.commit()
}

/// The temporary file of `path`: `.NAME.PID.tmp` in the same directory, so the rename stays on one
/// filesystem.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// True for a name [`temp_path`] makes (`.NAME.PID.tmp`).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn open_new(tmp: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o644);
    }
    opts.open(tmp)
}

/// Makes a rename in `path`'s directory durable. Some filesystems refuse a directory fsync, which is
/// harmless.
pub fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_and_drop_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
    }

    #[cfg(unix)]
    #[test]
    fn new_files_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        write(&path, b"x").unwrap();
        let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A plain File::create gets 0666 less the umask, which reveals the umask.
        let plain = dir.path().join("plain");
        File::create(&plain).unwrap();
        let umask = 0o666 & !mode_of(&plain);
        // 0644 less the umask (not the 0600 of a tempfile-made file).
        assert_eq!(mode_of(&path), 0o644 & !umask, "umask {umask:o}");
    }

    #[test]
    fn write_with_failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.txt");
        write(&path, b"keep").unwrap();
        let err = write_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("b.txt"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
