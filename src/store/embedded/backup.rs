//! Backups of the embedded store: one file holding every tree (jobs, the interaction log and
//! its indexes, the pause flag, the response cache, guild settings, conversations), taken
//! from a running server, and restored into an empty directory.
//!
//! # Format (version 1)
//!
//! ```text
//! "CHATQBK1"                                  magic and version
//! then, per tree:  0x01, name length (u16 BE), name
//!   then per entry: 0x02, key length (u32 BE), key, value length (u32 BE), value
//! 0x00                                        end
//! SHA-256 of every byte before it (32 bytes)
//! ```
//!
//! # Consistency
//!
//! The snapshot is taken while the server runs. Every job record is one key, read once, so
//! each job is in the backup in one of the states it passed through, and every job that was
//! acknowledged before the backup began is in it (an acknowledged push was flushed). The
//! `jobs` tree is written first, the interaction log after it: a job read as finished had its
//! log entry written before its record said so, so the entry is in the backup too (or the
//! record still says `log_pending`, and the restored store writes the entry at open). A job
//! read as `active` comes back queued at open, like after a crash.

use std::io::{BufReader, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::store::StoreError;

const MAGIC: &[u8; 8] = b"CHATQBK1";
const TREE: u8 = 1;
const ENTRY: u8 = 2;
const END: u8 = 0;
/// Larger keys or values than this mean a damaged file, not a record.
const MAX_LEN: usize = 64 * 1024 * 1024;

pub use crate::store::BackupSummary as Summary;

/// A writer that hashes and counts what passes through.
struct Hashing<'a> {
    out: &'a mut dyn Write,
    hash: Sha256,
    bytes: u64,
}

impl Hashing<'_> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what}: {e}").into())
}

fn corrupt(why: impl Into<String>) -> StoreError {
    StoreError::Corrupt(format!("not a usable chatq backup: {}", why.into()))
}

/// Writes every tree of `db` to `out`, `jobs` first (see the module docs).
pub fn write(db: &sled::Db, out: &mut dyn Write) -> Result<Summary, StoreError> {
    let mut names: Vec<sled::IVec> = db.tree_names();
    names.sort_by_key(|n| (n.as_ref() != b"jobs", n.clone()));
    let mut w = Hashing {
        out,
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut summary = Summary::default();
    let failed = |e| io("writing the backup", e);
    w.put(MAGIC).map_err(failed)?;
    for name in names {
        let tree = db.open_tree(&name)?;
        let len = u16::try_from(name.len()).map_err(|_| corrupt("a tree name is too long"))?;
        w.put(&[TREE]).map_err(failed)?;
        w.put(&len.to_be_bytes()).map_err(failed)?;
        w.put(&name).map_err(failed)?;
        summary.trees += 1;
        for item in tree.iter() {
            let (key, value) = item?;
            w.put(&[ENTRY]).map_err(failed)?;
            for part in [&key, &value] {
                w.put(&(part.len() as u32).to_be_bytes()).map_err(failed)?;
                w.put(part).map_err(failed)?;
            }
            summary.entries += 1;
        }
    }
    w.put(&[END]).map_err(failed)?;
    let digest = w.hash.finalize();
    w.out.write_all(&digest).map_err(failed)?;
    w.out.flush().map_err(failed)?;
    summary.bytes = w.bytes + digest.len() as u64;
    Ok(summary)
}

/// Reads a backup, handing each tree name and entry to `each`; checks the checksum at the
/// end (what `each` saw counts only if this returns `Ok`).
fn read(
    from: &mut dyn Read,
    mut each: impl FnMut(Item<'_>) -> Result<(), StoreError>,
) -> Result<Summary, StoreError> {
    struct Hashed<'a> {
        input: BufReader<&'a mut dyn Read>,
        hash: Sha256,
        bytes: u64,
    }
    impl Hashed<'_> {
        fn take(&mut self, n: usize) -> Result<Vec<u8>, StoreError> {
            let mut buf = vec![0; n];
            self.input
                .read_exact(&mut buf)
                .map_err(|_| corrupt("it ends early"))?;
            self.hash.update(&buf);
            self.bytes += n as u64;
            Ok(buf)
        }
        fn len32(&mut self) -> Result<usize, StoreError> {
            let b = self.take(4)?;
            let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if n > MAX_LEN {
                return Err(corrupt("a record length is out of range"));
            }
            Ok(n)
        }
    }
    let mut r = Hashed {
        input: BufReader::with_capacity(256 * 1024, from),
        hash: Sha256::new(),
        bytes: 0,
    };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(corrupt("it does not start with CHATQBK1"));
    }
    let mut summary = Summary::default();
    let mut in_tree = false;
    loop {
        match r.take(1)?[0] {
            TREE => {
                let b = r.take(2)?;
                let name = r.take(u16::from_be_bytes([b[0], b[1]]) as usize)?;
                each(Item::Tree(&name))?;
                in_tree = true;
                summary.trees += 1;
            }
            ENTRY if in_tree => {
                let n = r.len32()?;
                let key = r.take(n)?;
                let n = r.len32()?;
                let value = r.take(n)?;
                each(Item::Entry(&key, &value))?;
                summary.entries += 1;
            }
            END => break,
            _ => return Err(corrupt("an unknown record tag")),
        }
    }
    let expected = r.hash.finalize();
    let mut found = [0u8; 32];
    r.input
        .read_exact(&mut found)
        .map_err(|_| corrupt("the checksum is missing"))?;
    if found[..] != expected[..] {
        return Err(corrupt(
            "the checksum does not match (damaged or cut short)",
        ));
    }
    let mut rest = [0u8; 1];
    if r.input.read(&mut rest).map_err(|e| io("reading", e))? != 0 {
        return Err(corrupt("bytes follow the checksum"));
    }
    summary.bytes = r.bytes + 32;
    Ok(summary)
}

enum Item<'a> {
    Tree(&'a [u8]),
    Entry(&'a [u8], &'a [u8]),
}

/// Checks that the file at `path` is a whole, undamaged backup.
pub fn verify(path: &Path) -> Result<Summary, StoreError> {
    let mut file = std::fs::File::open(path).map_err(|e| io("opening the backup", e))?;
    read(&mut file, |_| Ok(()))
}

/// Restores the backup at `from` into `data_dir`, which must be empty or absent. A damaged
/// backup leaves nothing behind.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Summary, StoreError> {
    let occupied = std::fs::read_dir(data_dir)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(StoreError::Open {
            what: format!(
                "{} is not empty; restore into a new directory",
                data_dir.display()
            ),
            source: "the directory holds files".into(),
        });
    }
    // Checked whole first, so a damaged file never half-fills the directory.
    verify(from)?;
    let mut file = std::fs::File::open(from).map_err(|e| io("opening the backup", e))?;
    let db = sled::Config::new()
        .path(data_dir)
        .open()
        .map_err(|e| StoreError::Open {
            what: format!("could not create a store in {}", data_dir.display()),
            source: Box::new(e),
        })?;
    let mut tree: Option<sled::Tree> = None;
    let restored = read(&mut file, |item| {
        match item {
            Item::Tree(name) => tree = Some(db.open_tree(name)?),
            Item::Entry(key, value) => {
                if let Some(tree) = &tree {
                    tree.insert(key, value)?;
                }
            }
        }
        Ok(())
    })
    .and_then(|summary| {
        db.flush()?;
        Ok(summary)
    });
    drop(tree);
    drop(db);
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(data_dir);
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        db.open_tree("jobs")
            .unwrap()
            .insert(b"j1", b"record")
            .unwrap();
        db.open_tree("log")
            .unwrap()
            .insert(b"k", vec![7u8; 70_000])
            .unwrap();
        let mut bytes = Vec::new();
        let written = write(&db, &mut bytes).unwrap();
        assert_eq!(written.bytes, bytes.len() as u64);
        assert_eq!(written.entries, 2);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(bytes[8], TREE);
        assert_eq!(&bytes[11..15], b"jobs", "the jobs tree comes first");
        drop(db);

        let file = dir.path().join("backup");
        std::fs::write(&file, &bytes).unwrap();
        let target = dir.path().join("restored");
        let restored = restore(&file, &target).unwrap();
        assert_eq!(restored, written);
        let db = sled::Config::new().path(&target).open().unwrap();
        assert_eq!(
            db.open_tree("log")
                .unwrap()
                .get(b"k")
                .unwrap()
                .unwrap()
                .len(),
            70_000
        );
        assert_eq!(
            db.open_tree("jobs")
                .unwrap()
                .get(b"j1")
                .unwrap()
                .unwrap()
                .as_ref(),
            b"record"
        );
        drop(db);
        assert!(
            matches!(restore(&file, &target), Err(StoreError::Open { .. })),
            "a non-empty directory is refused"
        );

        for damaged in [
            bytes[..bytes.len() - 1].to_vec(),
            {
                let mut b = bytes.clone();
                b[20] ^= 1;
                b
            },
            [bytes.as_slice(), b"x"].concat(),
            b"CHATQBK2".to_vec(),
        ] {
            std::fs::write(&file, &damaged).unwrap();
            let target = dir.path().join("never");
            assert!(matches!(
                restore(&file, &target),
                Err(StoreError::Corrupt(_))
            ));
            assert!(!target.exists(), "nothing is left behind");
        }
    }
}
