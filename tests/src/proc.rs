//! Processes started inside a namespace.
//!
//! Children are forked from one long-lived spawner thread: `PR_SET_PDEATHSIG` fires when the
//! thread that forked a child exits, so forking from short-lived test threads would kill children
//! early, while the spawner thread lives as long as the test process (a crashed or killed test
//! binary takes its children with it).
use std::{
    ffi::CString,
    io::{self, Read},
    os::{fd::RawFd, unix::process::CommandExt as _},
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

/// How a child is isolated beyond its network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Isolation {
    /// Only the network namespace: the child shares the harness's mounts (its /sys/fs/bpf).
    NetOnly,
    /// As a container runtime (or `ip netns exec`) starts a process: its own mount namespace,
    /// nothing propagated back, and a fresh sysfs on /sys, so /sys/fs/bpf is an empty directory
    /// without bpffs, and whatever the child mounts dies with it. Then each (source, target)
    /// is bind-mounted, as a runtime mounts a pod's volumes and its resolv.conf (a source under
    /// /sys is the harness's: its bpffs, as a pod mounts the host's /sys/fs/bpf).
    Container { binds: Vec<(CString, CString)> },
}

type Request = (Command, RawFd, Isolation, mpsc::Sender<io::Result<Child>>);

/// At most this many bind mounts into one container (their descriptors live on the stack
/// between fork and exec, where nothing may allocate).
pub(crate) const MAX_BINDS: usize = 8;

/// The Container isolation, between fork and exec (raw system calls only). Each bind source is
/// cloned (open_tree) before /sys is replaced, so a source under the harness's /sys (its
/// bpffs) is the harness's, as a runtime's volume is the host's; each bind is then made a
/// recursive slave of its source (HostToContainer: mounts on the host reach the container,
/// never the other way).
fn enter_container_mounts(binds: &[(CString, CString)]) -> io::Result<()> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    if binds.len() > MAX_BINDS {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let mut trees = [-1 as libc::c_long; MAX_BINDS];
    // SAFETY: unshare, mount, umount2, open_tree and move_mount with C strings that live
    // until exec are async-signal-safe system calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS).into())?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            )
            .into(),
        )?;
        for ((source, _), tree) in binds.iter().zip(trees.iter_mut()) {
            *tree = check(libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                source.as_ptr(),
                OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
            ))?;
        }
        check(libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH).into())?;
        check(
            libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            )
            .into(),
        )?;
        for ((_, target), tree) in binds.iter().zip(trees) {
            check(libc::syscall(
                libc::SYS_move_mount,
                tree as libc::c_int,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ))?;
            libc::close(tree as libc::c_int);
            check(
                libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                )
                .into(),
            )?;
        }
        Ok(())
    }
}

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("egress-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, ns, isolation, reply) in rx {
                    // SAFETY: the closure only makes async-signal-safe system calls.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            if let Isolation::Container { binds } = &isolation {
                                enter_container_mounts(binds)?;
                            }
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    })
}

/// Starts `cmd` in the network namespace open as `ns` (which must stay open until this returns).
pub(crate) fn spawn_in(cmd: Command, ns: RawFd, isolation: Isolation) -> Result<Proc> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap()
        .send((cmd, ns, isolation, tx))
        .ok()
        .context("the spawner thread is gone")?;
    let child = rx.recv().context("the spawner thread is gone")??;
    Ok(Proc {
        pid: child.id(),
        child: Arc::new(Mutex::new(child)),
    })
}

/// A process started with [`Netns::spawn`](crate::Netns::spawn). Clones share the process.
/// Signals are only sent while the process has not been reaped, so a recycled pid is never hit.
#[derive(Clone, Debug)]
pub struct Proc {
    pid: u32,
    child: Arc<Mutex<Child>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has ended (reaping it), `None` while it runs.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        self.child.lock().unwrap().try_wait()
    }

    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_timeout(&self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            // Polling keeps the lock free for kill() and for the namespace's Drop.
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end, however long it takes.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(st);
            }
        }
    }

    /// Sends `sig` if the process is still running; returns whether it was.
    pub fn signal(&self, sig: Signal) -> io::Result<bool> {
        let mut child = self.child.lock().unwrap();
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig)?;
        Ok(true)
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> io::Result<()> {
        let mut child = self.child.lock().unwrap();
        child.kill()?;
        child.wait().map(drop)
    }

    /// Kills and reaps the process if it still runs; returns whether it did.
    pub(crate) fn kill_if_running(&self) -> bool {
        let mut child = self.child.lock().unwrap();
        match child.try_wait() {
            Ok(Some(_)) => false,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                true
            }
        }
    }

    /// The piped stdout, once.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.child.lock().unwrap().stdout.take()
    }

    /// The piped stderr, once.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.child.lock().unwrap().stderr.take()
    }

    /// Waits up to `timeout` for the process to end and collects its piped stdout and stderr
    /// (empty when not piped or already taken). On timeout the process is killed and this fails,
    /// showing what it printed.
    pub fn output(&self, timeout: Duration) -> Result<Output> {
        fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        }
        let out = reader(self.take_stdout());
        let err = reader(self.take_stderr());
        let status = self.wait_timeout(timeout)?;
        if status.is_none() {
            self.kill()?;
        }
        let output = Output {
            status: self.wait()?,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        };
        if status.is_none() {
            bail!(
                "process {} still running after {timeout:?}, killed; stdout:\n{}\nstderr:\n{}",
                self.pid,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }
}
