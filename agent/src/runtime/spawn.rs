//! Starting a job's process without copying the agent: `clone(CLONE_VM |
//! CLONE_VFORK)`, as glibc's `posix_spawn` does, so the cost does not grow with
//! the agent's memory (a `fork` copies its page tables, then the child's `exec`
//! tears them down: most of the agent's CPU per short job). What `posix_spawn`
//! cannot do, and Shoal needs, is done in the child before `exec`: the parent-death
//! signal (the job dies with its agent), its own process group, and the user it
//! runs as. Everything the child touches is prepared by the parent first; the
//! child makes raw system calls only (no allocation, no locks, no libc wrappers
//! that talk to other threads).
//!
//! The parent is suspended until the child has called `exec` (or failed), so the
//! child's stack and the prepared arguments outlive it. The child's exit is
//! followed through a pidfd.

#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;

/// What to start.
pub(crate) struct SpawnSpec<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: &'a std::collections::BTreeMap<String, String>,
    pub cwd: &'a Path,
    /// The user to run as (and its USER and LOGNAME); None: the agent's.
    pub user: Option<&'a super::RunAs>,
}

/// A started process: the leader of its own process group.
pub(crate) struct Spawned {
    pub pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

/// Why a start failed: the program was not found, or another error (said with
/// the step that failed).
pub(crate) enum SpawnError {
    NotFound,
    Other(io::Error),
}

/// The steps the child takes before `exec`, by the number it records.
const STEPS: [&str; 6] = [
    "cannot start a process group",
    "cannot set the parent-death signal",
    "cannot switch to the job's user",
    "cannot connect its input and output",
    "cannot enter the working folder",
    "cannot execute it",
];
const CWD: usize = 4;
const EXEC: usize = 5;

/// The agent's own environment, read once, each variable with its `KEY=value`
/// string: a job gets it beneath its own, pointed to, not copied.
fn agent_env() -> &'static [(std::ffi::OsString, CString)] {
    static ENV: OnceLock<Vec<(std::ffi::OsString, CString)>> = OnceLock::new();
    ENV.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                let entry = [key.as_bytes(), b"=", value.as_bytes()].concat();
                Some((key, CString::new(entry).ok()?))
            })
            .collect()
    })
}

/// Programs found on a PATH, by (program, PATH): a node that runs the same
/// command thousands of times searches its PATH once. Only PATHs of absolute
/// folders are kept (a relative one depends on the working folder).
type Found = std::collections::HashMap<(String, String), PathBuf>;

/// The most (program, PATH) pairs kept: jobs may each set a PATH of their own,
/// and an agent runs for months. Past it, what was kept is forgotten.
const FOUND_MAX: usize = 256;

fn found() -> std::sync::MutexGuard<'static, Found> {
    static FOUND: OnceLock<std::sync::Mutex<Found>> = OnceLock::new();
    FOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Keeps what a search found; past `FOUND_MAX` pairs, forgets the others first.
fn remember(found: &mut Found, key: (String, String), path: PathBuf) {
    if found.len() >= FOUND_MAX {
        found.clear();
    }
    found.insert(key, path);
}

/// How a program was found: where, and whether from what an earlier start found.
struct Resolved {
    path: PathBuf,
    remembered: Option<(String, String)>,
}

/// Finds `program` as `execvp` would, on the job's own PATH (or the agent's).
fn resolve(
    program: &str,
    env: &std::collections::BTreeMap<String, String>,
    cwd: &Path,
) -> Option<Resolved> {
    if program.contains('/') {
        return Some(Resolved {
            path: cwd.join(program),
            remembered: None,
        });
    }
    let path = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    if !std::env::split_paths(&path).all(|folder| folder.is_absolute()) {
        let path = which::which_in(program, Some(path), cwd).ok()?;
        return Some(Resolved {
            path,
            remembered: None,
        });
    }
    let key = (program.to_string(), path);
    if let Some(path) = found().get(&key) {
        return Some(Resolved {
            path: path.clone(),
            remembered: Some(key),
        });
    }
    let path = which::which_in(program, Some(&key.1), cwd).ok()?;
    remember(&mut found(), key, path.clone());
    Some(Resolved {
        path,
        remembered: None,
    })
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command"))
}

/// Everything the child reads, laid out before the clone.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    user: Option<(u32, u32)>,
    parent: libc::pid_t,
    mask: libc::sigset_t,
    /// The errno of the step that failed (0: exec succeeded), and which (`STEPS`).
    error: i32,
    step: usize,
}

/// The child, on its own small stack and the parent's memory: raw system calls
/// only, then `execve`; on failure it records the errno and exits with 127.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent is
    // suspended (CLONE_VFORK); only raw system calls follow.
    unsafe {
        let args = &mut *arg.cast::<ChildArgs>();
        let fail = |args: &mut ChildArgs, step: usize| -> libc::c_int {
            args.error = *libc::__errno_location();
            args.step = step;
            libc::syscall(libc::SYS_exit, 127);
            127
        };
        // Handlers the agent installed would run on the agent's memory: default
        // them. The kernel's sigaction starts with the handler, as libc's does, and
        // is smaller: a zeroed libc struct with SIG_DFL reads as SIG_DFL, no flags,
        // no mask.
        for signal in 1..65 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                std::ptr::null::<libc::sigaction>(),
                &mut old,
                8usize,
            ) == 0
                && old.sa_sigaction != libc::SIG_IGN
                && old.sa_sigaction != libc::SIG_DFL
            {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default,
                    std::ptr::null_mut::<libc::sigaction>(),
                    8usize,
                );
            }
        }
        if libc::syscall(libc::SYS_setpgid, 0, 0) != 0 {
            return fail(args, 0);
        }
        if libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL,
            0,
            0,
            0,
        ) != 0
        {
            return fail(args, 1);
        }
        // The agent died before the signal was set: do not run unsupervised.
        if libc::syscall(libc::SYS_getppid) as libc::pid_t != args.parent {
            libc::syscall(libc::SYS_exit, 127);
        }
        if let Some((uid, gid)) = args.user
            && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0)
        {
            return fail(args, 2);
        }
        for (from, to) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
            if libc::syscall(libc::SYS_dup3, from, to, 0) < 0 {
                return fail(args, 3);
            }
        }
        if libc::syscall(libc::SYS_chdir, args.cwd) != 0 {
            return fail(args, CWD);
        }
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &args.mask,
            std::ptr::null_mut::<libc::sigset_t>(),
            8usize,
        );
        libc::syscall(libc::SYS_execve, args.program, args.argv, args.envp);
        fail(args, EXEC)
    }
}

/// A pipe: its read end non-blocking (the agent's, read on the runtime), its
/// write end blocking (the job's).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((read, write))
}

/// The read end of a job's stdout or stderr, on the runtime.
pub(crate) type Output = tokio::net::unix::pipe::Receiver;

/// /dev/null, opened once (close-on-exec: the child's stdin is a copy).
fn dev_null() -> io::Result<RawFd> {
    static NULL: OnceLock<std::fs::File> = OnceLock::new();
    if let Some(null) = NULL.get() {
        return Ok(null.as_raw_fd());
    }
    let null = std::fs::File::open("/dev/null")?;
    Ok(NULL.get_or_init(|| null).as_raw_fd())
}

/// This process's id, asked once.
fn own_pid() -> libc::pid_t {
    static PID: OnceLock<libc::pid_t> = OnceLock::new();
    *PID.get_or_init(|| std::process::id() as libc::pid_t)
}

/// The child's stack: small, and only used while its parent thread is suspended
/// (CLONE_VFORK), so one a thread serves every start; never zeroed, which a
/// fresh one a start cost.
const STACK: usize = 64 * 1024;
thread_local! {
    static STACKS: std::cell::RefCell<Box<[std::mem::MaybeUninit<u8>]>> =
        std::cell::RefCell::new(Box::new_uninit_slice(STACK));
}

/// Starts the process (stdin from /dev/null, stdout and stderr to pipes); the
/// process and the read ends of its stdout and stderr, ready on the runtime (so
/// it must be called within one).
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> Result<(Spawned, Output, Output), SpawnError> {
    let resolved = resolve(spec.program, spec.env, spec.cwd).ok_or(SpawnError::NotFound)?;
    match (spawn_resolved(spec, &resolved.path), resolved.remembered) {
        // What an earlier start found is gone (or changed): search again.
        (Err(_), Some(key)) => {
            found().remove(&key);
            spawn(spec)
        }
        (started, _) => started,
    }
}

/// Starts `program`, found already (`resolve`).
fn spawn_resolved(
    spec: &SpawnSpec<'_>,
    program: &Path,
) -> Result<(Spawned, Output, Output), SpawnError> {
    let other = SpawnError::Other;
    let program = cstring(program.as_os_str().as_bytes()).map_err(other)?;
    let mut argv = vec![cstring(spec.program.as_bytes()).map_err(other)?];
    for arg in spec.args {
        argv.push(cstring(arg.as_bytes()).map_err(other)?);
    }
    // The agent's environment, with the job's over it (as `Command::envs`), and
    // the user's names over both.
    let user_env = spec
        .user
        .map(|u| [("USER", u.name.as_str()), ("LOGNAME", u.name.as_str())]);
    let by_user = |key: &str| spec.user.is_some() && (key == "USER" || key == "LOGNAME");
    let own: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| !by_user(k))
        .chain(user_env.into_iter().flatten())
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<_>>()
        .map_err(other)?;
    let beneath = agent_env()
        .iter()
        .filter(|(key, _)| {
            key.to_str()
                .is_none_or(|key| !spec.env.contains_key(key) && !by_user(key))
        })
        .map(|(_, entry)| entry);
    let cwd = cstring(OsStr::as_bytes(spec.cwd.as_os_str())).map_err(other)?;
    let pointers = |strings: &mut dyn Iterator<Item = &CString>| -> Vec<*const libc::c_char> {
        strings
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let argv_p = pointers(&mut argv.iter());
    let envp_p = pointers(&mut beneath.chain(&own));
    let stdin = dev_null().map_err(other)?;
    let (out_r, out_w) = pipe().map_err(other)?;
    let (err_r, err_w) = pipe().map_err(other)?;
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        cwd: cwd.as_ptr(),
        stdin,
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        user: spec.user.map(|u| (u.uid, u.gid)),
        parent: own_pid(),
        // SAFETY: a plain C struct, filled by pthread_sigmask below.
        mask: unsafe { std::mem::zeroed() },
        error: 0,
        step: 0,
    };
    // SAFETY: all signals are blocked around the clone (a handler must not run
    // in the child on the shared memory); the child gets the old mask back just
    // before exec. CLONE_VFORK suspends this thread until the child has exec'd
    // or exited, so `args`, the strings and the stack outlive its use of them,
    // and no other start on this thread uses the stack meanwhile.
    let pid = STACKS
        .with_borrow_mut(|stack| unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.mask);
            let top = stack.as_mut_ptr().add(stack.len()).cast::<libc::c_void>();
            let pid = libc::clone(
                child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw mut args).cast::<libc::c_void>(),
            );
            let error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
            if pid < 0 { Err(error) } else { Ok(pid) }
        })
        .map_err(other)?;
    drop((out_w, err_w));
    if args.error != 0 {
        // It exited with 127 without exec: reap it.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let error = io::Error::from_raw_os_error(args.error);
        if args.step == EXEC && error.kind() == io::ErrorKind::NotFound {
            return Err(SpawnError::NotFound);
        }
        let step = STEPS.get(args.step).copied().unwrap_or("cannot start it");
        let step = if args.step == CWD {
            format!("{step} {}", spec.cwd.display())
        } else {
            step.to_string()
        };
        return Err(SpawnError::Other(io::Error::new(
            error.kind(),
            format!("{step}: {error}"),
        )));
    }
    // SAFETY: pidfd_open(2) with a pid this process has not reaped yet.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let error = io::Error::last_os_error();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(other(error));
    }
    // SAFETY: a new descriptor this process owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: an OwnedFd keeps its one descriptor open until it is dropped.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| other(e.into()))?;
    let spawned = Spawned {
        pid,
        pidfd,
        reaped: false,
    };
    // Non-blocking pipes already (`pipe`); a failure here drops `spawned`,
    // which kills and reaps the process.
    let output = |fd| Output::from_owned_fd_unchecked(fd).map_err(other);
    Ok((spawned, output(out_r)?, output(err_r)?))
}

impl Spawned {
    /// Waits for the process to end; its exit status.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        loop {
            let mut ready = self.pidfd.readable().await?;
            let mut status = 0;
            // SAFETY: waitpid(2) on this process's own child, without blocking.
            let reaped = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if reaped == self.pid {
                self.reaped = true;
                return Ok(std::process::ExitStatus::from_raw(status));
            }
            if reaped < 0 {
                return Err(io::Error::last_os_error());
            }
            ready.clear_ready();
        }
    }
}

impl Drop for Spawned {
    /// Never left as a zombie: killed (with its group) and reaped off the runtime.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(pid, None);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn start(
        program: &str,
        args: &[&str],
        env: &BTreeMap<String, String>,
        cwd: &Path,
    ) -> Result<(Spawned, Output, Output), SpawnError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        spawn(&SpawnSpec {
            program,
            args: &args,
            env,
            cwd,
            user: None,
        })
    }

    #[tokio::test]
    async fn runs_in_its_folder_with_its_env_in_a_group_of_its_own() {
        let dir = tempfile::tempdir().expect("dir");
        let env = BTreeMap::from([
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("GREETING".to_string(), "hi".to_string()),
        ]);
        let Ok((mut child, out, _err)) = start(
            "sh",
            &[
                "-c",
                "echo $GREETING $(pwd); ps -o pgid= -p $$; echo $HOME; exit 7",
            ],
            &env,
            dir.path(),
        ) else {
            panic!("sh did not start");
        };
        let status = child.wait().await.expect("waited");
        assert_eq!(status.code(), Some(7));
        let text = std::fs::read_to_string(format!("/proc/self/fd/{}", out.as_raw_fd()))
            .unwrap_or_default();
        let mut lines = text.lines();
        let real = dir.path().canonicalize().expect("real path");
        assert_eq!(
            lines.next(),
            Some(format!("hi {}", real.display()).as_str())
        );
        assert_eq!(
            lines.next().map(str::trim),
            Some(child.pid.to_string().as_str())
        );
        // The agent's own variables are kept beneath the job's.
        let home = std::env::var("HOME").expect("the test has a HOME");
        assert_eq!(lines.next(), Some(home.as_str()));
    }

    #[tokio::test]
    async fn a_job_variable_replaces_the_agents_own() {
        let dir = tempfile::tempdir().expect("dir");
        let env = BTreeMap::from([
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("HOME".to_string(), "/the/job/home".to_string()),
        ]);
        let Ok((mut child, out, _err)) = start("sh", &["-c", "env"], &env, dir.path()) else {
            panic!("sh did not start");
        };
        assert_eq!(child.wait().await.expect("waited").code(), Some(0));
        let text = std::fs::read_to_string(format!("/proc/self/fd/{}", out.as_raw_fd()))
            .unwrap_or_default();
        let named = |key: &str| -> Vec<&str> {
            let prefix = format!("{key}=");
            text.lines().filter(|l| l.starts_with(&prefix)).collect()
        };
        assert_eq!(named("HOME"), ["HOME=/the/job/home"], "{text}");
        assert_eq!(named("PATH"), ["PATH=/usr/bin:/bin"], "{text}");
        // What the job does not set, it has from the agent.
        let (key, value) = std::env::vars()
            .find(|(k, v)| {
                // Neither the job's, nor what sh sets itself, nor a name sh
                // might not pass on.
                !["HOME", "PATH", "PWD", "OLDPWD", "SHLVL", "_"].contains(&k.as_str())
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !v.contains('\n')
            })
            .expect("the test has a variable of its own");
        assert_eq!(named(&key), [format!("{key}={value}")], "{text}");
    }

    #[tokio::test]
    async fn a_missing_program_is_not_found() {
        let env = BTreeMap::new();
        assert!(matches!(
            start("no-such-program-xyz", &[], &env, Path::new("/")),
            Err(SpawnError::NotFound)
        ));
        // A folder that is not there fails in the child, and is said as such
        // (not as a missing program).
        let missing = Path::new("/no/such/folder");
        match start("true", &[], &env, missing) {
            Err(SpawnError::Other(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
                let said = e.to_string();
                assert!(
                    said.starts_with("cannot enter the working folder /no/such/folder:"),
                    "{said}"
                );
            }
            Err(SpawnError::NotFound) => panic!("a missing folder said as a missing program"),
            Ok(_) => panic!("started in a folder that does not exist"),
        }
    }

    #[tokio::test]
    async fn a_program_found_before_and_gone_since_is_searched_for_again() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("dir");
        let (first, second) = (root.path().join("first"), root.path().join("second"));
        for (folder, code) in [(&first, 3), (&second, 4)] {
            std::fs::create_dir(folder).expect("folder");
            let program = folder.join("shoal-test-found");
            std::fs::write(&program, format!("#!/bin/sh\nexit {code}\n")).expect("script");
            std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))
                .expect("mode");
        }
        let path = std::env::join_paths([&first, &second, &PathBuf::from("/usr/bin")])
            .expect("PATH")
            .into_string()
            .expect("UTF-8");
        let env = BTreeMap::from([("PATH".to_string(), path)]);
        let code = |started: Result<(Spawned, Output, Output), SpawnError>| async move {
            let Ok((mut child, _out, _err)) = started else {
                panic!("did not start");
            };
            child.wait().await.expect("waited").code()
        };
        // The first on the PATH, found and then remembered.
        for _ in 0..2 {
            assert_eq!(
                code(start("shoal-test-found", &[], &env, root.path())).await,
                Some(3)
            );
        }
        // Gone from there: the next start finds the one further on.
        std::fs::remove_file(first.join("shoal-test-found")).expect("removed");
        assert_eq!(
            code(start("shoal-test-found", &[], &env, root.path())).await,
            Some(4)
        );
        // Gone from everywhere: not found (not a stale path's exec error).
        std::fs::remove_file(second.join("shoal-test-found")).expect("removed");
        assert!(matches!(
            start("shoal-test-found", &[], &env, root.path()),
            Err(SpawnError::NotFound)
        ));
    }

    #[test]
    fn what_is_kept_of_paths_searched_stays_bounded() {
        let mut found = Found::new();
        let key = |i: usize| ("true".to_string(), format!("/opt/run-{i}/bin:/usr/bin"));
        for i in 0..FOUND_MAX {
            remember(&mut found, key(i), PathBuf::from("/usr/bin/true"));
        }
        assert_eq!(found.len(), FOUND_MAX);
        // One more: the others are forgotten, the newest kept.
        remember(&mut found, key(FOUND_MAX), PathBuf::from("/usr/bin/true"));
        assert_eq!(found.len(), 1);
        assert!(found.contains_key(&key(FOUND_MAX)));
    }

    #[test]
    fn the_process_dies_with_the_thread_that_started_it() {
        // The parent-death signal follows the starting thread: when it ends, so
        // does the process (as when the agent dies).
        let pid = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let env = BTreeMap::new();
                let Ok((child, _out, _err)) = start("sleep", &["30"], &env, Path::new("/")) else {
                    panic!("sleep did not start");
                };
                let pid = child.pid;
                std::mem::forget(child);
                pid
            })
        })
        .join()
        .expect("joined");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) on this test process's own child.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                assert!(libc::WIFSIGNALED(status), "status {status}");
                assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process outlived its parent thread"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
