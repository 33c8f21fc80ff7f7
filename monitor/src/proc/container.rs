//! Which container and Kubernetes pod a process runs in, from its cgroup path and environment.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Container {
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The 64-hex-digit container id (docker, containerd, CRI-O).
    pub container_id: Option<String>,
    /// The pod's UID, from the kubepods cgroup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's name: Kubernetes sets the container's HOSTNAME to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// Reads /proc/PID/cgroup and, inside a pod, HOSTNAME from /proc/PID/environ.
pub(crate) fn container_of(pid: u32) -> Container {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut c = parse_cgroup(&cgroup);
    if c.pod_uid.is_some() {
        c.pod_name = std::fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|env| {
                env.split(|b| *b == 0)
                    .find_map(|kv| kv.strip_prefix(b"HOSTNAME="))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
    }
    c
}

fn parse_cgroup(cgroup: &str) -> Container {
    let mut c = Container::default();
    for segment in cgroup.lines().flat_map(|l| l.split('/')) {
        if let Some(pod) = segment
            .strip_prefix("kubepods-")
            .and_then(|s| s.rsplit_once("-pod").map(|(_, p)| p))
            .or_else(|| segment.strip_prefix("pod"))
        {
            let uid = pod.trim_end_matches(".slice").replace('_', "-");
            if uid.len() == 36 {
                c.pod_uid = Some(uid);
            }
        }
        let id = segment
            .rsplit_once('-')
            .map_or(segment, |(_, id)| id)
            .trim_end_matches(".scope");
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            c.container_id = Some(id.to_owned());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_kubepods_cgroup() {
        let id = "a".repeat(64);
        let line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-{id}.scope"
        );
        let c = parse_cgroup(&line);
        assert_eq!(c.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("1b2c3d4e-0000-1111-2222-333344445555")
        );
    }

    #[test]
    fn cgroupfs_docker_and_host() {
        let id = "0123456789abcdef".repeat(4);
        let c = parse_cgroup(&format!("0::/docker/{id}"));
        assert_eq!(c.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(c.pod_uid, None);
        assert_eq!(
            parse_cgroup("0::/user.slice/user-0.slice/session-1.scope"),
            Container::default()
        );
    }
}
