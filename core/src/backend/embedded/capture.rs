//! The embedded store's capture log: JSON-lines files in a directory beside the store file,
//! one open file per process at a time, rotated by size and age. A file is named
//! `capture-<first write, ms>-<pid>-<n>.jsonl`, so a reader can tell from the name (and the
//! file's modification time) which files a window needs.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;

use crate::backend::CaptureLog;
use crate::config::StoreConfig;
use crate::error::{ReasonCode, Result, SluiceError};

/// How long after its lines a chunk may be written (the writer's flush interval, and then some).
const WRITE_DELAY_MARGIN_MS: u64 = 3_600_000;

pub(super) struct CaptureFiles {
    dir: PathBuf,
    rotate_bytes: u64,
    rotate_after_ms: u64,
    /// `store.capture.retention_days`; 0: files are kept.
    retention_ms: u64,
    current: Arc<Mutex<Option<OpenFile>>>,
}

struct OpenFile {
    path: PathBuf,
    started_ms: u64,
    bytes: u64,
}

impl CaptureFiles {
    pub(super) fn new(config: &StoreConfig) -> Self {
        Self {
            dir: config.capture_dir(),
            rotate_bytes: config.capture.rotate_bytes.max(1),
            rotate_after_ms: config.capture.rotate_after_s.saturating_mul(1000).max(1),
            retention_ms: config.capture.retention_days.saturating_mul(24 * 3_600_000),
            current: Arc::default(),
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> SluiceError {
    SluiceError::retryable(ReasonCode::StoreUnavailable, format!("{}: {e}", path.display()))
}

/// The first-write time in a capture file's name.
fn started_ms(name: &str) -> Option<u64> {
    name.strip_prefix("capture-")?.strip_suffix(".jsonl")?.split('-').next()?.parse().ok()
}

/// When a file was last written (ms since the epoch), where the file system says.
fn modified_ms(entry: &std::fs::DirEntry) -> Option<u64> {
    let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
    modified.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis() as u64)
}

/// Deletes the capture files of `dir` last written before `before_ms`. Not being able to is said,
/// not an error: the capture goes on.
fn delete_older(dir: &Path, before_ms: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut deleted = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if started_ms(&name).is_none() || modified_ms(&entry).is_none_or(|ms| ms >= before_ms) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %io_error(&entry.path(), e), "capture: an old file could not be deleted"),
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, dir = %dir.display(), "capture: files past store.capture.retention_days deleted");
    }
}

/// A file's bytes; `None` if there is no such file.
async fn read_if_there(path: PathBuf) -> Result<Option<Vec<u8>>> {
    blocking(move || match std::fs::read(&path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path, e)),
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SluiceError::retryable(ReasonCode::Internal, format!("capture task: {e}")))?
}

#[async_trait]
impl CaptureLog for CaptureFiles {
    async fn append(&self, lines: Vec<u8>, at_ms: u64) -> Result<()> {
        let (dir, current) = (self.dir.clone(), Arc::clone(&self.current));
        let (rotate_bytes, rotate_after_ms, retention_ms) =
            (self.rotate_bytes, self.rotate_after_ms, self.retention_ms);
        blocking(move || {
            let mut current = current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let due = current.as_ref().is_none_or(|file| {
                file.bytes >= rotate_bytes || at_ms.saturating_sub(file.started_ms) >= rotate_after_ms
            });
            if due {
                std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
                let mut n = 0;
                let path = loop {
                    let path = dir.join(format!("capture-{at_ms:013}-{}-{n}.jsonl", std::process::id()));
                    if !path.exists() {
                        break path;
                    }
                    n += 1;
                };
                *current = Some(OpenFile { path, started_ms: at_ms, bytes: 0 });
                if retention_ms > 0 {
                    delete_older(&dir, at_ms.saturating_sub(retention_ms));
                }
            }
            let file = current.as_mut().expect("a file is open");
            let mut out =
                OpenOptions::new().create(true).append(true).open(&file.path).map_err(|e| io_error(&file.path, e))?;
            out.write_all(&lines).map_err(|e| io_error(&file.path, e))?;
            file.bytes += lines.len() as u64;
            Ok(())
        })
        .await
    }

    async fn chunks(&self, since_ms: u64, until_ms: u64) -> Result<Vec<String>> {
        let dir = self.dir.clone();
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_error(&dir, e)),
            };
            let mut wanted: Vec<(u64, String)> = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(started) = started_ms(&name) else { continue };
                let modified_ms = modified_ms(&entry).unwrap_or(u64::MAX);
                // A file holds lines from its first write to its last (its modification time);
                // a chunk is written a little after its lines were stored, so a file begun just
                // past the window's end may still hold some of its lines.
                if started <= until_ms.saturating_add(WRITE_DELAY_MARGIN_MS) && modified_ms >= since_ms {
                    wanted.push((started, name));
                }
            }
            wanted.sort();
            Ok(wanted.into_iter().map(|(_, name)| name).collect())
        })
        .await
    }

    async fn chunk(&self, name: &str) -> Result<Option<Vec<u8>>> {
        read_if_there(self.dir.join(name)).await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        read_if_there(self.dir.join("monitor").join(name)).await
    }

    async fn put_meta(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let dir = self.dir.join("monitor");
        let name = name.to_owned();
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
            // Written aside and renamed, so a reader never sees half a document.
            let (path, partial) = (dir.join(&name), dir.join(format!(".{name}.partial")));
            std::fs::write(&partial, &data).map_err(|e| io_error(&partial, e))?;
            std::fs::rename(&partial, &path).map_err(|e| io_error(&path, e))
        })
        .await
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_carry_their_first_write() {
        assert_eq!(started_ms("capture-0001795000000000-12-0.jsonl"), Some(1_795_000_000_000));
        assert_eq!(started_ms("notes.txt"), None);
    }

    #[tokio::test]
    async fn files_rotate_by_size_and_age_and_are_read_back_by_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        config.capture.rotate_bytes = 10;
        config.capture.rotate_after_s = 60;
        let log = CaptureFiles::new(&config);
        log.append(b"aaaa\n".to_vec(), 1_000).await.unwrap();
        log.append(b"bbbb\n".to_vec(), 2_000).await.unwrap(); // same file: 5 bytes < 10
        log.append(b"cccc\n".to_vec(), 3_000).await.unwrap(); // full: a new file
        log.append(b"dddd\n".to_vec(), 4 * 3_600_000).await.unwrap(); // too old: a new file
        let files = std::fs::read_dir(config.capture_dir()).unwrap().count();
        assert_eq!(files, 3);
        let all = log.read(0, u64::MAX).await.unwrap();
        assert_eq!(all.concat(), b"aaaa\nbbbb\ncccc\ndddd\n");
        // Files first written well after the window's end are left out.
        assert_eq!(log.read(0, 2_500).await.unwrap().concat(), b"aaaa\nbbbb\ncccc\n");

        assert_eq!(log.get_meta("state.json").await.unwrap(), None);
        log.put_meta("state.json", b"{}".to_vec()).await.unwrap();
        assert_eq!(log.get_meta("state.json").await.unwrap(), Some(b"{}".to_vec()));
        assert_eq!(log.read(0, u64::MAX).await.unwrap().len(), 3, "meta documents are not capture");
    }

    /// Starting a file deletes those last written past the retention; the others and what is not
    /// a capture file stay.
    #[tokio::test]
    async fn a_new_file_deletes_those_past_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        config.capture.retention_days = 2;
        let log = CaptureFiles::new(&config);
        let day = 24 * 3_600_000;
        let now = crate::envelope::now_ms();
        log.append(b"old\n".to_vec(), now - 3 * day).await.unwrap();
        log.append(b"recent\n".to_vec(), now - day).await.unwrap();
        let names = log.chunks(0, u64::MAX).await.unwrap();
        assert_eq!(names.len(), 2);
        for (name, age) in names.iter().zip([3 * day, day]) {
            let file = std::fs::File::options().append(true).open(config.capture_dir().join(name)).unwrap();
            file.set_modified(UNIX_EPOCH + std::time::Duration::from_millis(now - age)).unwrap();
        }
        std::fs::write(config.capture_dir().join("notes.txt"), "kept").unwrap();
        log.append(b"now\n".to_vec(), now).await.unwrap();
        assert_eq!(log.read(0, u64::MAX).await.unwrap().concat(), b"recent\nnow\n");
        assert!(config.capture_dir().join("notes.txt").exists());
    }
}
