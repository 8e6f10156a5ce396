//! The two libc calls std does not wrap: poll(2) and setrlimit(2). Kept here so every
//! `unsafe` block in the crate is in one small, reviewed place.

use std::io;
use std::time::Duration;

/// poll(2) over `fds`, retrying on EINTR. Returns the number of ready descriptors.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the duration of
        // the call, and its length is passed alongside.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Raises RLIMIT_NOFILE's soft limit to at least `want` (also the hard limit if we are
/// allowed to). Returns the soft limit now in effect; not reaching `want` is not an error
/// here: the connections that do not fit are reported as failures.
// rlim_t is u64 here but not on every target; the casts keep this portable.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur as u64 >= want {
        return Ok(lim.rlim_cur as u64);
    }
    let raised = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: (lim.rlim_max as u64).max(want) as libc::rlim_t,
    };
    // SAFETY: `raised` is a valid rlimit for setrlimit to read.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    // Not privileged to raise the hard limit: go as high as it allows.
    let capped = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } == 0 {
        return Ok(lim.rlim_max as u64);
    }
    Ok(lim.rlim_cur as u64)
}
