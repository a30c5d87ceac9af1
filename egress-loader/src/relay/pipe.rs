//! Pipes as splice(2) buffers, lent by a bounded pool only while data is in flight.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Pipe capacity asked for. The kernel default (16 slots, 64 KiB of pages) needs twice as many
/// splice calls per byte and measured no better than copying; a 1 MiB pipe (the unprivileged
/// maximum) costs its 256-slot ring (about 10 KiB) plus the pages in flight. Measured on loopback:
/// proxy CPU about 0.3 s per GB with 1 MiB pipes, 0.5 s with 64 KiB pipes, 0.6 s copying.
pub const PIPE_SIZE: usize = 1024 * 1024;
/// A pipe smaller than this (the kernel gives 2-slot pipes to a user over
/// fs.pipe-user-pages-soft) is not worth splicing through.
const PIPE_MIN: usize = 64 * 1024;
/// After failing to make a pipe, do not try again for this long.
const PIPE_RETRY: Duration = Duration::from_secs(1);

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller for the duration of the call; no
    // offsets (both ends are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe used as a splice buffer.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Keep what we have when the kernel refuses to grow it (limits for unprivileged users).
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        // SAFETY: as above.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let capacity = size as usize;
        if capacity < PIPE_MIN {
            return Err(io::Error::other(format!(
                "pipe of {capacity} bytes only (fs.pipe-user-pages-soft reached)"
            )));
        }
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// At most `max` pipes, shared by every connection, each lent for one chunk's trip.
pub struct PipePool {
    state: Mutex<PoolState>,
    max: usize,
}

struct PoolState {
    free: Vec<Pipe>,
    /// Pipes in existence (free or lent).
    total: usize,
    /// No new pipe before this (the last attempt failed).
    retry_at: Option<Instant>,
}

impl PipePool {
    pub fn new(max: usize) -> PipePool {
        PipePool {
            state: Mutex::new(PoolState {
                free: Vec::new(),
                total: 0,
                retry_at: None,
            }),
            max,
        }
    }

    /// A free pipe, a new one if the pool may grow, or None (copy this chunk).
    pub(super) fn get(&self) -> Option<PooledPipe<'_>> {
        let mut st = self.state.lock().unwrap();
        if let Some(pipe) = st.free.pop() {
            return Some(PooledPipe {
                pipe: Some(pipe),
                pool: self,
            });
        }
        if st.total >= self.max || st.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        match Pipe::new() {
            Ok(pipe) => {
                st.total += 1;
                Some(PooledPipe {
                    pipe: Some(pipe),
                    pool: self,
                })
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot make a splice pipe; copying for now");
                st.retry_at = Some(Instant::now() + PIPE_RETRY);
                None
            }
        }
    }

    /// Pipes in existence, and how many of them are free (for tests and logs).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap();
        (st.total, st.free.len())
    }
}

/// A lent pipe: [`PooledPipe::release`] gives it back empty; dropped otherwise (it may hold data),
/// it is closed.
pub(super) struct PooledPipe<'a> {
    pipe: Option<Pipe>,
    pool: &'a PipePool,
}

impl PooledPipe<'_> {
    fn pipe(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("pipe present until release or drop")
    }

    pub(super) fn read_fd(&self) -> RawFd {
        self.pipe().read.as_raw_fd()
    }

    pub(super) fn write_fd(&self) -> RawFd {
        self.pipe().write.as_raw_fd()
    }

    pub(super) fn capacity(&self) -> usize {
        self.pipe().capacity
    }

    /// Back to the pool; only when the pipe is empty.
    pub(super) fn release(mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.state.lock().unwrap().free.push(pipe);
        }
    }
}

impl Drop for PooledPipe<'_> {
    fn drop(&mut self) {
        if self.pipe.take().is_some() {
            self.pool.state.lock().unwrap().total -= 1;
        }
    }
}
