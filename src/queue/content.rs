//! Message content on its way into the queue and back out, in bounded
//! memory. While DATA streams in, a [`Spool`] keeps the first
//! [`IN_MEMORY_LIMIT`] octets in memory (every ordinary message) and moves
//! anything bigger to a file in `data_dir/spool/`; the queue writer copies
//! it into the `message_contents` table with SQLite's incremental BLOB I/O,
//! a chunk at a time, and the file is removed. Delivery reads content back
//! the same way ([`ContentReader`]), so neither a 25 MiB message nor fifty
//! of them at once need their size in memory.
//!
//! The spool file is scratch space: durability comes from the queue commit
//! (synchronous=FULL) that the 250 waits for, not from the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::data_dir::SPOOL_DIR;
use crate::store::{ReadPool, StoreError};

/// Content up to this size stays in memory; beyond it, it goes to a file.
pub const IN_MEMORY_LIMIT: usize = 128 * 1024;
/// Unit of copying between files, the database and sockets.
pub const CHUNK: usize = 64 * 1024;

/// A spool file, removed when dropped (after its content is in the queue,
/// or when the message is refused or the client goes away).
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    file: File,
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A message body as it was received.
#[derive(Debug)]
pub enum Body {
    Memory(Vec<u8>),
    File { file: SpoolFile, len: u64 },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the body from its start, as it was received.
    pub fn reader(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Body::Memory(bytes) => Box::new(&bytes[..]),
            Body::File { file, .. } => {
                let mut reader = &file.file;
                reader.seek(io::SeekFrom::Start(0))?;
                Box::new(reader)
            }
        })
    }
}

/// What the queue stores for a message: trace headers we add in front
/// (Received, and for local submissions the ones sendmail adds) and the
/// body as it came.
#[derive(Debug)]
pub struct Content {
    pub prefix: Vec<u8>,
    pub body: Body,
}

impl Content {
    /// Reads the whole content, prefix first, from the start (the spool
    /// file's position does not matter: storing seeks again).
    pub fn reader(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new((&self.prefix[..]).chain(self.body.reader()?)))
    }

    /// Content held in memory: notices, local submissions, tests.
    pub fn in_memory(bytes: Vec<u8>) -> Content {
        Content {
            prefix: Vec::new(),
            body: Body::Memory(bytes),
        }
    }

    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Collects a body while it streams in: memory first, then a file.
pub struct Spool {
    dir: PathBuf,
    memory: Vec<u8>,
    file: Option<SpoolFile>,
    len: u64,
}

impl Spool {
    /// A spool for one message; files go to `data_dir/spool/`.
    pub fn new(data_dir: &Path) -> Spool {
        Spool {
            dir: data_dir.join(SPOOL_DIR),
            memory: Vec::new(),
            file: None,
            len: 0,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.len += bytes.len() as u64;
        if let Some(spool) = &mut self.file {
            return spool.file.write_all(bytes);
        }
        if self.memory.len() + bytes.len() <= IN_MEMORY_LIMIT {
            self.memory.extend_from_slice(bytes);
            return Ok(());
        }
        let mut spool = create_spool_file(&self.dir)?;
        spool.file.write_all(&self.memory)?;
        spool.file.write_all(bytes)?;
        self.memory = Vec::new();
        self.file = Some(spool);
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The collected body, ready for the queue.
    pub fn finish(self) -> io::Result<Body> {
        match self.file {
            None => Ok(Body::Memory(self.memory)),
            Some(mut spool) => {
                spool.file.flush()?;
                Ok(Body::File {
                    file: spool,
                    len: self.len,
                })
            }
        }
    }
}

fn create_spool_file(dir: &Path) -> io::Result<SpoolFile> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    crate::store::data_dir::create_private_dir(dir)?;
    let name = format!(
        "{}.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        crate::dns::random_u64()
    );
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok(SpoolFile { path, file })
}

/// Removes spool files a crash left behind: their messages never got a
/// 250, so their senders will send them again.
pub fn clear_spool(data_dir: &Path) -> io::Result<usize> {
    let dir = data_dir.join(SPOOL_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Stores a message's content (inside the caller's transaction), copying
/// a spooled body a chunk at a time; returns its id for `messages.content_id`.
pub fn store(conn: &Connection, message_id: &str, content: &Content) -> Result<i64, StoreError> {
    let error = |what: &str| StoreError::sqlite(format!("{message_id}: {what}"));
    let insert = |value: &dyn rusqlite::ToSql| -> Result<i64, StoreError> {
        conn.prepare_cached("INSERT INTO message_contents (content) VALUES (?1)")
            .and_then(|mut statement| statement.insert(params![value]))
            .map_err(error("cannot store the content"))
    };
    match &content.body {
        Body::Memory(bytes) if content.prefix.is_empty() => return insert(bytes),
        Body::Memory(bytes) if bytes.len() <= IN_MEMORY_LIMIT => {
            let mut whole = Vec::with_capacity(content.prefix.len() + bytes.len());
            whole.extend_from_slice(&content.prefix);
            whole.extend_from_slice(bytes);
            return insert(&whole);
        }
        _ => {}
    }
    let rowid = insert(&rusqlite::blob::ZeroBlob(content.len()))?;
    let mut blob = conn
        .blob_open("main", "message_contents", "content", rowid, false)
        .map_err(error("cannot open the content for writing"))?;
    let mut at = 0usize;
    let mut put = |bytes: &[u8]| -> Result<(), StoreError> {
        blob.write_at(bytes, at)
            .map_err(error("cannot write the content"))?;
        at += bytes.len();
        Ok(())
    };
    put(&content.prefix)?;
    match &content.body {
        Body::Memory(bytes) => {
            for chunk in bytes.chunks(CHUNK) {
                put(chunk)?;
            }
        }
        Body::File { file, len } => {
            let spool_error = |e: io::Error| {
                StoreError::new(format!("{message_id}: cannot read the spool file: {e}"))
            };
            let mut reader = &file.file;
            reader.seek(io::SeekFrom::Start(0)).map_err(spool_error)?;
            let mut buffer = vec![0u8; CHUNK];
            let mut copied = 0u64;
            while copied < *len {
                let n = reader.read(&mut buffer).map_err(spool_error)?;
                if n == 0 {
                    return Err(StoreError::new(format!(
                        "{message_id}: the spool file is shorter than the message"
                    )));
                }
                put(&buffer[..n])?;
                copied += n as u64;
            }
        }
    }
    Ok(rowid)
}

/// The first `limit` octets of a message (headers for notices and `queue
/// show`), read without loading the rest.
pub fn head(conn: &Connection, message_id: &str, limit: usize) -> Result<Vec<u8>, StoreError> {
    let mut reader = ContentReader::new(message_id);
    let mut head = Vec::new();
    while head.len() < limit && !reader.finished() {
        let chunk = reader.read_chunk(conn, limit - head.len())?;
        if chunk.is_empty() {
            break;
        }
        head.extend_from_slice(&chunk);
    }
    Ok(head)
}

/// Reads a stored message a chunk at a time. Each chunk is its own short
/// read transaction, so a slow remote server never holds one open.
pub struct ContentReader {
    message_id: String,
    offset: usize,
    /// Known after the first chunk.
    size: Option<usize>,
}

impl ContentReader {
    pub fn new(message_id: &str) -> ContentReader {
        ContentReader {
            message_id: message_id.to_string(),
            offset: 0,
            size: None,
        }
    }

    /// Everything has been read.
    pub fn finished(&self) -> bool {
        self.size.is_some_and(|size| self.offset >= size)
    }

    /// The next chunk (at most `max` octets, at most [`CHUNK`]); empty at
    /// the end. An error when the message left the queue meanwhile.
    pub fn read_chunk(&mut self, conn: &Connection, max: usize) -> Result<Vec<u8>, StoreError> {
        let id = &self.message_id;
        let error = |what: &'static str| StoreError::sqlite(format!("{id}: {what}"));
        let tx = conn
            .unchecked_transaction()
            .map_err(error("cannot begin reading the content"))?;
        // Looked up in the same transaction as the read: a content id freed
        // by a deleted message may meanwhile belong to another one.
        let rowid: Option<i64> = tx
            .prepare_cached("SELECT content_id FROM messages WHERE id = ?1")
            .and_then(|mut statement| statement.query_row([id], |row| row.get(0)).optional())
            .map_err(error("cannot find the content"))?
            .flatten();
        let Some(rowid) = rowid else {
            return Err(StoreError::new(format!(
                "{id}: the message is no longer in the queue"
            )));
        };
        let blob = tx
            .blob_open("main", "message_contents", "content", rowid, true)
            .map_err(error("cannot open the content"))?;
        self.size = Some(blob.len());
        let left = blob.len().saturating_sub(self.offset);
        let mut chunk = vec![0u8; left.min(max).min(CHUNK)];
        let n = blob
            .read_at(&mut chunk, self.offset)
            .map_err(error("cannot read the content"))?;
        chunk.truncate(n);
        self.offset += n;
        drop(blob);
        tx.finish()
            .map_err(error("cannot finish reading the content"))?;
        Ok(chunk)
    }

    /// Pulls the whole message through `sink`, a chunk at a time.
    pub fn copy_to(
        &mut self,
        pool: &ReadPool,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), CopyError> {
        while !self.finished() {
            let chunk = pool
                .run(|conn| self.read_chunk(conn, CHUNK))
                .map_err(CopyError::Queue)?;
            if chunk.is_empty() {
                break;
            }
            sink(&chunk).map_err(CopyError::Sink)?;
        }
        Ok(())
    }
}

/// Why a copy out of the queue stopped.
#[derive(Debug)]
pub enum CopyError {
    Queue(StoreError),
    Sink(io::Error),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Queue(error) => error.fmt(f),
            CopyError::Sink(error) => error.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_db(dir: &Path) -> Connection {
        crate::store::open_direct(dir).unwrap()
    }

    fn insert(conn: &Connection, id: &str, content: &Content) {
        let content_id = store(conn, id, content).unwrap();
        conn.execute(
            "INSERT INTO messages (id, received_at, sender, listener, size, content_id)
             VALUES (?1, '2026-11-29 00:00:00', '', 'local', ?2, ?3)",
            params![id, content.len() as i64, content_id],
        )
        .unwrap();
    }

    fn read_all(pool: &ReadPool, id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ContentReader::new(id)
            .copy_to(pool, |chunk| {
                assert!(chunk.len() <= CHUNK);
                out.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn small_bodies_stay_in_memory_large_ones_go_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path());
        spool.write(&[b'a'; 1000]).unwrap();
        assert!(matches!(spool.finish().unwrap(), Body::Memory(b) if b.len() == 1000));

        let mut spool = Spool::new(dir.path());
        for _ in 0..40 {
            spool.write(&[b'b'; 10_000]).unwrap();
        }
        let body = spool.finish().unwrap();
        let Body::File { file, len } = &body else {
            panic!("expected a spool file");
        };
        assert_eq!(*len, 400_000);
        let path = file.path.clone();
        assert_eq!(fs::metadata(&path).unwrap().len(), 400_000);
        drop(body);
        assert!(!path.exists(), "dropped spool files are removed");
    }

    #[test]
    fn content_round_trips_through_the_queue_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = queue_db(dir.path());
        let pool = ReadPool::new(&dir.path().join(crate::store::data_dir::QUEUE_FILE), 2);
        let mut spool = Spool::new(dir.path());
        let mut expected = b"Received: by test\r\n".to_vec();
        for n in 0..30_000u32 {
            let line = format!("line {n} of a big message\r\n");
            spool.write(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        let content = Content {
            prefix: b"Received: by test\r\n".to_vec(),
            body: spool.finish().unwrap(),
        };
        assert!(matches!(content.body, Body::File { .. }));
        insert(&conn, "BIG", &content);
        insert(
            &conn,
            "SMALL",
            &Content::in_memory(b"Subject: s\r\n\r\nx\r\n".to_vec()),
        );
        assert_eq!(read_all(&pool, "BIG"), expected);
        assert_eq!(read_all(&pool, "SMALL"), b"Subject: s\r\n\r\nx\r\n");
        assert_eq!(head(&conn, "BIG", 19).unwrap(), b"Received: by test\r\n");
        let error = ContentReader::new("GONE")
            .read_chunk(&conn, CHUNK)
            .unwrap_err();
        assert!(
            error.to_string().contains("no longer in the queue"),
            "{error}"
        );
    }
}
