//! The socket's listener: a thread that accepts, and a short-lived thread per client (a few at
//! a time), each bounded in what it reads and how long it waits, so no client can hold up the
//! daemon or another client.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::{
    Shared, SocketError,
    protocol::{Reply, Request},
};

/// Clients served at once; more are told the daemon is busy.
const MAX_CLIENTS: usize = 4;
/// Bytes of a request line, at most.
const MAX_REQUEST: u64 = 4096;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds `path`, readable and writable by root only: bound under a temporary name, restricted,
/// then renamed into place, so no one connects before it is restricted. A socket left by a
/// daemon that stopped is replaced; one a live daemon answers on is not.
pub(super) fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse {
            path: path.to_path_buf(),
        });
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(listener)
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
                let Ok(mut stream) = stream else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
                    let _ = reply(&mut stream, &Reply::Error("the daemon is busy".into()));
                    continue;
                }
                let (shared, active, dumping) = (
                    Arc::clone(&shared),
                    Arc::clone(&active),
                    Arc::clone(&dumping),
                );
                let client = std::thread::Builder::new()
                    .name("leakmon-client".into())
                    .spawn(move || {
                        if let Err(e) = handle(stream, &shared, &dumping) {
                            log::debug!("socket client: {e}");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
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
    serde_json::to_writer(&mut *stream, r).map_err(std::io::Error::other)?;
    stream.write_all(b"\n")
}

fn handle(mut stream: UnixStream, shared: &Shared, dumping: &Mutex<()>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return reply(&mut stream, &Reply::Error(format!("bad request: {e}"))),
    };
    match request {
        Request::View => reply(&mut stream, &Reply::View(shared.view())),
        Request::Dump {
            pid,
            format,
            leaked,
        } => {
            let Ok(_one) = dumping.try_lock() else {
                return reply(
                    &mut stream,
                    &Reply::Error("another dump is under way; try again".into()),
                );
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
            reply(&mut stream, &Reply::Dump)?;
            stream.write_all(&bytes)
        }
    }
}
