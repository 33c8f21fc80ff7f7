//! tracefs: not needed by uprobes created through perf (what we use), but the kernel's
//! uprobe_events and the doctor's checks live there, and fresh hosts often lack the mount.

use std::{io, path::Path};

pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub(crate) enum TracefsError {
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed: run \
         `mount -t tracefs nodev {TRACEFS}` as root (in Kubernetes, mount the host's \
         {TRACEFS} into the pod)"
    )]
    Mount(#[source] io::Error),
}

pub(crate) fn is_mounted() -> bool {
    Path::new(TRACEFS).join("uprobe_events").exists()
}

/// Mounts tracefs when it is absent.
pub(crate) fn ensure_mounted() -> Result<(), TracefsError> {
    if is_mounted() {
        return Ok(());
    }
    let cstr = |s: &str| std::ffi::CString::new(s).map_err(io::Error::other);
    let (src, target, fstype) = (
        cstr("nodev").map_err(TracefsError::Mount)?,
        cstr(TRACEFS).map_err(TracefsError::Mount)?,
        cstr("tracefs").map_err(TracefsError::Mount)?,
    );
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(io::Error::last_os_error()));
    }
    log::info!("mounted tracefs at {TRACEFS}");
    Ok(())
}
