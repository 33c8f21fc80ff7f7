//! Asking a running daemon over its socket (`leakmon dump`, `leakmon top`), with a deadline on
//! every wait so a daemon that hangs never hangs the client.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{Reply, Request, View};

/// A dump takes seconds at 100,000 tasks; a view is at hand.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of a reply line, at most.
const MAX_LINE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("no leakmon daemon socket at {path} (is `leakmon run` running?)")]
    Missing { path: PathBuf },
    #[error(
        "no leakmon daemon answers at {path} (a socket left by a daemon that stopped? start \
         `leakmon run`)"
    )]
    Refused { path: PathBuf },
    #[error("{path}: permission denied: the daemon serves root only (run this as root)")]
    Denied { path: PathBuf },
    #[error("talking to the daemon at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {path} said: {message}")]
    Daemon { path: PathBuf, message: String },
}

impl ClientError {
    /// Whether no daemon is there to ask (the caller may do the work itself).
    pub(crate) fn no_daemon(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::Refused { .. })
    }
}

fn ask(path: &Path, request: &Request) -> Result<(BufReader<UnixStream>, Reply), ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ClientError::Missing {
            path: path.to_path_buf(),
        },
        io::ErrorKind::ConnectionRefused => ClientError::Refused {
            path: path.to_path_buf(),
        },
        io::ErrorKind::PermissionDenied => ClientError::Denied {
            path: path.to_path_buf(),
        },
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    (&mut reader)
        .take(MAX_LINE)
        .read_line(&mut first)
        .map_err(io)?;
    let reply: Reply = serde_json::from_str(&first)
        .map_err(|e| io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if let Reply::Error(message) = reply {
        return Err(ClientError::Daemon {
            path: path.to_path_buf(),
            message,
        });
    }
    Ok((reader, reply))
}

/// What the daemon saw at its last scan.
pub(crate) fn view(path: &Path) -> Result<View, ClientError> {
    match ask(path, &Request::View)? {
        (_, Reply::View(v)) => Ok(v),
        _ => Err(ClientError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not a view"),
        }),
    }
}

/// A dump of `pid` taken by the daemon, copied to `out`.
pub(crate) fn dump(
    path: &Path,
    pid: u32,
    format: crate::dump::DumpFormat,
    leaked: bool,
    out: &mut dyn io::Write,
) -> Result<(), ClientError> {
    let (reader, reply) = ask(
        path,
        &Request::Dump {
            pid,
            format,
            leaked,
        },
    )?;
    let Reply::Dump { len } = reply else {
        return Err(ClientError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not a dump"),
        });
    };
    let copied = io::copy(&mut reader.take(len), out).map_err(|source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if copied != len {
        return Err(ClientError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the dump was cut off after {copied} of {len} bytes"),
            ),
        });
    }
    Ok(())
}
