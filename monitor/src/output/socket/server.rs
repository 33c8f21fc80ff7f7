//! The socket's listener: a thread that accepts, and a short-lived thread per client (a few at
//! a time), each with one deadline for its request and one for its reply, so no client, slow
//! or hostile, can hold up the daemon or another client for long.

use std::{
    io::{Read as _, Write as _},
    os::unix::{
        fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
        net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{
        Arc, Mutex, TryLockError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    Shared, SocketError,
    protocol::{Reply, Request},
};

/// Clients served at once; more are told the daemon is busy.
const MAX_CLIENTS: usize = 4;
/// Bytes of a request line, at most.
const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request, and to read its reply.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const REPLY_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes written per step of a reply (each step checks the deadline).
const WRITE_CHUNK: usize = 64 << 10;

/// Binds `path`, readable and writable by root only: bound in a fresh directory only root
/// can enter, restricted, then renamed into place, so no one can connect before it is
/// restricted. A socket left by a daemon that stopped is replaced; one a live daemon answers
/// on, or a file that is not a socket, is not.
pub(super) fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotSocket {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
            });
        }
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(err)?;
    let private = dir.join(format!(".leakmon-socket.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let bound = (|| {
        let tmp = private.join("sock");
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(err)
}

/// A client's place among the [`MAX_CLIENTS`], given back however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts clients on a thread of its own until the daemon exits.
pub(super) fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let active = Arc::new(AtomicUsize::new(0));
    // One dump at a time: each reads a whole process.
    let dumping = Arc::new(Mutex::new(()));
    let spawned = std::thread::Builder::new()
        .name("leakmon-socket".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else {
                    // Out of file descriptors, say: wait rather than spin.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let slot = Slot(Arc::clone(&active));
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
                    let _ = reply(&mut stream, &Reply::Error("the daemon is busy".into()));
                    continue;
                }
                let (shared, dumping) = (Arc::clone(&shared), Arc::clone(&dumping));
                let client = std::thread::Builder::new()
                    .name("leakmon-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = handle(stream, &shared, &dumping) {
                            log::debug!("socket client: {e}");
                        }
                    });
                if client.is_err() {
                    log::warn!("socket: no thread for a client");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("socket: not served ({e})");
    }
}

fn reply(stream: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// The request line, read within [`REQUEST_DEADLINE`] however slowly it comes.
fn read_request(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') && line.len() < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    Ok(line)
}

/// Writes `bytes` within [`REPLY_DEADLINE`], however slowly the client reads.
fn write_within(stream: &mut UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + REPLY_DEADLINE;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        stream.write_all(chunk)?;
    }
    Ok(())
}

fn handle(mut stream: UnixStream, shared: &Shared, dumping: &Mutex<()>) -> std::io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let line = read_request(&mut stream)?;
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return reply(&mut stream, &Reply::Error(format!("bad request: {e}"))),
    };
    match request {
        Request::View => {
            let mut bytes =
                serde_json::to_vec(&Reply::View(shared.view())).map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            write_within(&mut stream, &bytes)
        }
        Request::Dump {
            pid,
            format,
            leaked,
        } => {
            let bytes = {
                let _one = match dumping.try_lock() {
                    Ok(guard) => guard,
                    // A client thread that panicked holds nothing any more.
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => {
                        return reply(
                            &mut stream,
                            &Reply::Error("another dump is under way; try again".into()),
                        );
                    }
                };
                let mut dump = match crate::dump::take(pid, &shared.dump) {
                    Ok(d) => d,
                    Err(e) => return reply(&mut stream, &Reply::Error(crate::sys::chain(&e))),
                };
                // What the daemon has judged over time, which a dump alone cannot.
                shared.judge(&mut dump);
                if leaked {
                    dump.leaked_only();
                }
                let mut bytes = Vec::new();
                dump.write(format, &mut bytes)?;
                bytes
            };
            reply(
                &mut stream,
                &Reply::Dump {
                    len: bytes.len() as u64,
                },
            )?;
            write_within(&mut stream, &bytes)
        }
    }
}
