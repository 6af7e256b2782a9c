//! Named cursors: one small file each under `cursors/`, written atomically.

use super::error::{io_error, LogError};
use super::format::{le32, sync_dir};
use super::{CURSOR_DIR, CURSOR_LEN, MAX_CURSOR_NAME};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn cursor_path(log_dir: &Path, name: &str) -> Result<PathBuf, LogError> {
    if valid_cursor_name(name) {
        Ok(log_dir.join(CURSOR_DIR).join(name))
    } else {
        Err(LogError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// The position saved under `name` in the log in `log_dir`, `None` if never set.
pub(super) fn read_cursor(log_dir: &Path, name: &str) -> Result<Option<u64>, LogError> {
    let path = cursor_path(log_dir, name)?;
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open cursor", &path)(e)),
    };
    let mut bytes = Vec::with_capacity(CURSOR_LEN + 1);
    file.take(CURSOR_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error("read cursor", &path))?;
    decode_cursor(&bytes)
        .map(Some)
        .map_err(|reason| LogError::CorruptCursor { path, reason })
}

/// Saves `position` under `name` in the log in `log_dir` atomically (temporary file, fsync, rename, fsync of the
/// directory; the fsyncs only with `fsync`). Callers serialise the writes of one log (they share temporary names).
pub(super) fn write_cursor(
    log_dir: &Path,
    name: &str,
    position: u64,
    fsync: bool,
) -> Result<(), LogError> {
    let path = cursor_path(log_dir, name)?;
    let dir = log_dir.join(CURSOR_DIR);
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_error("chmod directory", &dir))?;
            if fsync {
                sync_dir(log_dir)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create directory", &dir)(e)),
    }
    let tmp = dir.join(format!("{name}.tmp"));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|file| {
            file.write_all_at(&encode_cursor(position), 0)?;
            if fsync {
                file.sync_data()?;
            }
            Ok(())
        })
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write cursor", &path)(e));
    }
    if fsync {
        sync_dir(&dir)?;
    }
    Ok(())
}

pub(super) fn valid_cursor_name(name: &str) -> bool {
    (1..=MAX_CURSOR_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && name != "."
        && name != ".."
        && name.strip_suffix(".tmp").is_none() // set_cursor writes `<name>.tmp` next to the cursor
}

pub(super) fn encode_cursor(position: u64) -> [u8; CURSOR_LEN] {
    let mut out = [0u8; CURSOR_LEN];
    let position = position.to_le_bytes();
    out[..8].copy_from_slice(&position);
    out[8..].copy_from_slice(&crc32c::crc32c(&position).to_le_bytes());
    out
}

pub(super) fn decode_cursor(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() != CURSOR_LEN {
        return Err(format!("{} bytes instead of {CURSOR_LEN}", bytes.len()));
    }
    if crc32c::crc32c(&bytes[..8]) != le32(bytes, 8) {
        return Err("checksum mismatch".into());
    }
    let mut position = [0u8; 8];
    position.copy_from_slice(&bytes[..8]);
    Ok(u64::from_le_bytes(position))
}
