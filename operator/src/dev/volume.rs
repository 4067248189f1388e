//! A pod's projected volume, written the way kubelet's `AtomicWriter` writes it, so the
//! sidecar's reload path sees in `trellis dev` exactly what it sees in a cluster:
//!
//! ```text
//! <dir>/..2026_11_25_17_00_00.123456789/{config.json,ca.pem,labels,token}   the payload
//! <dir>/..data -> ..2026_11_25_17_00_00.123456789                           swapped atomically
//! <dir>/config.json -> ..data/config.json                                   stable names
//! ```
//!
//! An update writes a new timestamped directory, points a temporary symlink at it, renames that
//! over `..data` (one atomic `rename(2)`), then removes the old directory. A reader never sees a
//! half-written file or a mix of old and new files.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

/// The data symlink kubelet swaps.
pub const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Replaces the volume's content with `files` (name -> bytes) atomically. Returns whether
/// anything changed: equal content is not rewritten (kubelet does the same), so proxies do not
/// see spurious reloads.
pub fn write(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    if current(dir)?.as_ref() == Some(files) {
        return Ok(false);
    }
    let old = std::fs::read_link(dir.join(DATA_LINK)).ok();
    let stamp = jiff::Timestamp::now()
        .strftime("..%Y_%m_%d_%H_%M_%S.%f")
        .to_string();
    let mut ts_name = stamp.clone();
    let mut n = 0;
    while dir.join(&ts_name).exists() {
        n += 1;
        ts_name = format!("{stamp}{n}");
    }
    let ts_dir = dir.join(&ts_name);
    std::fs::create_dir(&ts_dir)?;
    for (name, bytes) in files {
        if name.contains('/') || name.starts_with("..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad projected file name {name:?}"),
            ));
        }
        std::fs::write(ts_dir.join(name), bytes)?;
    }
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(&ts_name, &tmp)?;
    std::fs::rename(&tmp, dir.join(DATA_LINK))?;
    for name in files.keys() {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(name), &link)?;
        }
    }
    if let Some(old) = old
        && old != Path::new(&ts_name)
    {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(true)
}

/// The files `..data` points at now, if any.
fn current(dir: &Path) -> io::Result<Option<BTreeMap<String, Vec<u8>>>> {
    let data = dir.join(DATA_LINK);
    if std::fs::symlink_metadata(&data).is_err() {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&data)? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cfg: &str) -> BTreeMap<String, Vec<u8>> {
        [
            ("config.json".to_string(), cfg.as_bytes().to_vec()),
            ("token".to_string(), b"t".to_vec()),
        ]
        .into()
    }

    #[test]
    fn swaps_like_kubelet_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        assert!(write(d.path(), &files("v1")).unwrap());
        assert_eq!(std::fs::read(d.path().join("config.json")).unwrap(), b"v1");
        assert_eq!(
            std::fs::read_link(d.path().join("config.json")).unwrap(),
            Path::new("..data/config.json")
        );
        let first = std::fs::read_link(d.path().join(DATA_LINK)).unwrap();
        assert!(
            !write(d.path(), &files("v1")).unwrap(),
            "unchanged content is not rewritten"
        );
        assert!(write(d.path(), &files("v2")).unwrap());
        assert_eq!(std::fs::read(d.path().join("config.json")).unwrap(), b"v2");
        assert!(!d.path().join(first).exists(), "old payload removed");
        // Exactly: ..data, one timestamped dir, the two file links.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }
}
